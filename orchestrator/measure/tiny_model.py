"""A tiny random-weight Llama plus PEFT LoRA adapters that a real (CPU) vLLM can serve.

Why: the orchestrator's end-to-end tests and local demos need a model vLLM really loads, with
many adapters of different ranks, without downloading gigabytes or waiting minutes. Everything
here is generated from a seed in about a second: a BPE tokenizer trained on seeded made-up
sentences (no downloads), a 2-layer Llama with random weights, and adapters whose B matrices
are non-zero, so each adapter really changes the model's output.

torch and tokenizers are imported inside the functions that need them, so importing this module
(e.g. from the CLI) stays cheap. transformers is not needed to build, only to load the result.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.serving.registry import REGISTRY_NAME

if TYPE_CHECKING:
    import torch

BASE_DIR = "base"
ADAPTERS_DIR = "adapters"
DTYPE = "bfloat16"  # what vLLM's CPU backend runs by default ("auto" downcasts float32 anyway)

# Head sizes vLLM's CPU attention backend has kernels for (CPUAttentionBackend).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# vLLM's LoRAConfig.max_lora_rank must be one of these; an adapter rank may be any value <= it.
MAX_VLLM_LORA_RANK = 512

# Every Llama linear layer vLLM applies LoRA to. vLLM packs q/k/v into qkv_proj and gate/up into
# gate_up_proj (LlamaForCausalLM.packed_modules_mapping) but expects the PEFT (unpacked) names.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, *ROLE_TOKENS)  # ids 0..6, in this order
# Zephyr-style: enough for /v1/chat/completions; roles other than the three above stay plain text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_BASE_SEED_SALT = 0x7A11
_ADAPTER_SEED_SALT = 0xADA9


class TinyModelError(ValueError):
    """A bad spec, argument or registry; the message names the offending field."""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the random Llama. Defaults build in ~1 s and start in vLLM CPU in ~15-20 s."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 256
    vocab_size: int = 2048
    max_position_embeddings: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TinyModelError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise TinyModelError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.hidden_size % self.num_heads:
            raise TinyModelError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if self.head_dim not in CPU_HEAD_SIZES:
            raise TinyModelError(
                f"hidden_size / num_heads (head_dim) = {self.head_dim} is not a head size "
                f"vLLM's CPU attention supports {CPU_HEAD_SIZES} (must be >= 32)"
            )
        if self.num_heads % self.num_kv_heads:
            raise TinyModelError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        # The tokenizer needs its ~100 single characters plus the specials before any merge.
        if not 512 <= self.vocab_size <= 65536:
            raise TinyModelError(f"vocab_size must be in [512, 65536], got {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TinyAdapter:
    """One PEFT LoRA adapter directory; `path` is absolute."""

    id: str
    rank: int
    path: Path


@dataclass(frozen=True)
class TinyModel:
    """A built (or loaded) tiny model: all paths absolute."""

    root: Path
    base_path: Path
    adapters: tuple[TinyAdapter, ...]
    registry_path: Path

    def adapter(self, adapter_id: str) -> TinyAdapter:
        """The adapter called `adapter_id` (KeyError if there is none)."""
        for a in self.adapters:
            if a.id == adapter_id:
                return a
        raise KeyError(adapter_id)


# ----------------------------------------------------------------------------- build
def build_tiny_model(
    out_dir: str | Path,
    n_adapters: int = 4,
    ranks: Sequence[int] = (8, 16),
    spec: TinyModelSpec = TinyModelSpec(),  # frozen, so one shared default is safe
    overwrite: bool = False,
) -> TinyModel:
    """Write a servable base model and `n_adapters` LoRA adapters under `out_dir`.

    Layout: OUT/base/ (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, generation_config.json), OUT/adapters/<id>/ (adapter_config.json,
    adapter_model.safetensors) with ids adapter-0000, adapter-0001, ... and ranks assigned
    round-robin over `ranks`, and OUT/adapters.yaml, a registry
    ``{base_model: base, adapters: [{id, rank, path}]}`` with paths relative to OUT.
    Adapters target the attention and MLP projections vLLM supports for Llama and have non-zero
    B matrices, so they change the output. Everything is a deterministic function of
    (spec, n_adapters, ranks): the same seed gives byte-identical weights and tokenizer.

    A non-empty OUT is refused (FileExistsError) unless `overwrite`; then only what a previous
    build wrote (base/, adapters/, adapters.yaml) is removed, never other files.
    """
    if not isinstance(n_adapters, int) or isinstance(n_adapters, bool) or n_adapters < 0:
        raise TinyModelError(f"n_adapters must be a non-negative integer, got {n_adapters!r}")
    ranks = tuple(ranks)
    if n_adapters and not ranks:
        raise TinyModelError("ranks must not be empty when n_adapters > 0")
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_VLLM_LORA_RANK:
            raise TinyModelError(
                f"ranks: each rank must be in [1, {MAX_VLLM_LORA_RANK}], got {r!r}"
            )

    root = Path(out_dir).expanduser().resolve()
    _prepare_out_dir(root, overwrite)
    base = root / BASE_DIR
    base.mkdir(parents=True)

    import torch

    _write_tokenizer(base, spec)
    _write_base_config(base, spec)
    _save_tensors(base / "model.safetensors", _base_weights(spec, torch))

    adapters: list[TinyAdapter] = []
    for i in range(n_adapters):
        adapter_id = f"adapter-{i:04d}"
        rank = ranks[i % len(ranks)]
        path = root / ADAPTERS_DIR / adapter_id
        path.mkdir(parents=True)
        _write_json(path / "adapter_config.json", _adapter_config(rank, base))
        _save_tensors(
            path / "adapter_model.safetensors", _adapter_weights(spec, rank, i, torch)
        )
        adapters.append(TinyAdapter(adapter_id, rank, path))

    registry = root / REGISTRY_NAME
    _write_registry(registry, root, base, adapters)
    return TinyModel(root, base, tuple(adapters), registry)


def _prepare_out_dir(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{root} is not empty; pass overwrite=True (CLI: --force) to replace a "
                "previous tiny model there"
            )
        for name in (BASE_DIR, ADAPTERS_DIR):
            shutil.rmtree(root / name, ignore_errors=True)
        (root / REGISTRY_NAME).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # "format": "pt" is what transformers' from_pretrained insists on.
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates the file 0600; let a vLLM under another user read it


# ----------------------------------------------------------------------------- tokenizer
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "ch", "sh", "th", "st", "tr", "br", "pl", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "st")
_COMMON = ("the", "a", "of", "and", "to", "in", "is", "that", "it", "with", "for", "on", "was",
           "as", "by", "this", "from", "at", "be", "are", "hello", "world", "model", "adapter",
           "token", "serve", "fleet", "request", "please", "what", "why", "how", "you", "we")
_PUNCT = (".", ".", ".", "?", "!", ",")
_SPACE = "\u2581"
# Printable ASCII without space (that is _SPACE) and without \r \x0b \x0c, so decoded text is tame.
_ALPHABET = (*(chr(c) for c in range(0x21, 0x7F)), "\n", "\t", _SPACE)


def _corpus(spec: TinyModelSpec) -> list[str]:
    """Seeded made-up sentences (no downloads): enough distinct words to fill the vocab."""
    rng = random.Random(spec.seed)
    words: set[str] = set()
    n_words = max(2000, spec.vocab_size)
    while len(words) < n_words:
        syllables = rng.randint(1, 3)
        words.add("".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(syllables)
        ))
    lexicon = sorted(words)
    sentences = []
    for _ in range(max(3000, 2 * spec.vocab_size)):
        n = rng.randint(4, 14)
        ws = [rng.choice(_COMMON) if rng.random() < 0.3 else rng.choice(lexicon)
              for _ in range(n)]
        if rng.random() < 0.2:
            ws.insert(rng.randint(1, n - 1), str(rng.randint(0, 9999)))
        sentences.append(" ".join(ws).capitalize() + rng.choice(_PUNCT))
    return sentences


def _write_tokenizer(base: Path, spec: TinyModelSpec) -> None:
    """BPE over printable ASCII with exactly spec.vocab_size ids.

    Not byte-level on purpose: a random model emits arbitrary ids, and with byte tokens those
    decode to broken UTF-8 (U+FFFD) in API responses. Here every id decodes to clean text;
    the price is that non-ASCII characters encode to <unk>.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # SentencePiece-style word boundaries (U+2581), as in Llama-2 tokenizers.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(_ALPHABET),
        limit_alphabet=len(_ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec), trainer)
    missing = spec.vocab_size - tok.get_vocab_size()
    if missing > 0:  # the corpus ran out of merges: pad with inert reserved tokens
        tok.add_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(missing)])
    # Llama-style: prepend BOS when the caller asks for special tokens (completions API).
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tok.save(str(base / "tokenizer.json"))

    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    _write_json(base / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": list(ROLE_TOKENS),
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(base / "special_tokens_map.json", {
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "additional_special_tokens": list(ROLE_TOKENS),
    })


# ----------------------------------------------------------------------------- base model
def _base_config(spec: TinyModelSpec) -> dict[str, Any]:
    rope_theta = 10000.0
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        # transformers >= 5 reads rope_parameters; older readers read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_theta": rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "use_cache": True,
        # transformers >= 5 says "dtype", older versions "torch_dtype".
        "dtype": DTYPE,
        "torch_dtype": DTYPE,
    }


def _write_base_config(base: Path, spec: TinyModelSpec) -> None:
    cfg = _base_config(spec)
    _write_json(base / "config.json", cfg)
    # No sampling defaults here: vLLM applies generation_config.json defaults to every request.
    _write_json(base / "generation_config.json", {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"],
    })


def _linear_shapes(spec: TinyModelSpec) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection, as in HF's LlamaDecoderLayer."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    q = spec.num_heads * spec.head_dim
    return {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (spec.intermediate_size, h), "up_proj": (spec.intermediate_size, h),
        "down_proj": (h, spec.intermediate_size),
    }


def _module_prefix(name: str) -> str:
    return "self_attn" if name in ATTENTION_MODULES else "mlp"


def _base_weights(spec: TinyModelSpec, torch: Any) -> dict[str, torch.Tensor]:
    """HF Llama state dict: N(0, 0.02) linears/embeddings (transformers' init), unit norms."""
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + _BASE_SEED_SALT)
    dtype = getattr(torch, DTYPE)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype)

    h, v = spec.hidden_size, spec.vocab_size
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(v, h)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = ones(h)
        out[f"{p}.post_attention_layernorm.weight"] = ones(h)
        for name, shape in _linear_shapes(spec).items():
            out[f"{p}.{_module_prefix(name)}.{name}.weight"] = normal(*shape)
    out["model.norm.weight"] = ones(h)
    out["lm_head.weight"] = normal(v, h)
    return out


# ----------------------------------------------------------------------------- adapters
def _adapter_config(rank: int, base: Path) -> dict[str, Any]:
    """PEFT LoraConfig fields vLLM's PEFTHelper reads (plus what PEFT itself needs)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 2 * rank,  # scaling 2: a visible effect on a random base model
        "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _adapter_weights(
    spec: TinyModelSpec, rank: int, index: int, torch: Any
) -> dict[str, torch.Tensor]:
    """PEFT state dict: A ~ N(0, 1/in), B ~ N(0, 0.02^2) - B non-zero, unlike PEFT's init."""
    seed = (spec.seed * 1_000_003 + _ADAPTER_SEED_SALT) * 1_000_003 + index
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, DTYPE)
    out: dict[str, torch.Tensor] = {}
    for layer in range(spec.num_layers):
        for name, (n_out, n_in) in _linear_shapes(spec).items():
            p = f"base_model.model.model.layers.{layer}.{_module_prefix(name)}.{name}"
            a = torch.randn(rank, n_in, generator=gen) / math.sqrt(n_in)
            b = torch.randn(n_out, rank, generator=gen) * 0.02
            out[f"{p}.lora_A.weight"] = a.to(dtype)
            out[f"{p}.lora_B.weight"] = b.to(dtype)
    return out


# ----------------------------------------------------------------------------- registry
def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _write_registry(registry: Path, root: Path, base: Path, adapters: list[TinyAdapter]) -> None:
    import yaml

    doc = {
        "base_model": _rel(base, root),
        "adapters": [{"id": a.id, "rank": a.rank, "path": _rel(a.path, root)} for a in adapters],
    }
    registry.write_text(yaml.safe_dump(doc, sort_keys=False))


def load_tiny_model(root: str | Path) -> TinyModel:
    """Read OUT/adapters.yaml back, resolving its relative paths against OUT.

    Checks that the base model and every adapter directory hold the files vLLM loads, so a
    half-written or moved tree fails here (FileNotFoundError) instead of inside a vLLM worker.
    """
    import yaml

    root = Path(root).expanduser().resolve()
    registry = root / REGISTRY_NAME
    if not registry.is_file():
        raise FileNotFoundError(f"{registry}: no tiny-model registry (build one first)")
    doc = yaml.safe_load(registry.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("base_model"), str):
        raise TinyModelError(f"{registry}: base_model must be a path string")
    entries = doc.get("adapters") or []
    if not isinstance(entries, list):
        raise TinyModelError(f"{registry}: adapters must be a list")

    base = (root / doc["base_model"]).resolve()
    _require_files(base, ("config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json"))
    adapters: list[TinyAdapter] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"id", "rank", "path"} <= set(entry):
            raise TinyModelError(f"{registry}: adapters[{i}] needs id, rank and path")
        adapter_id, rank = str(entry["id"]), entry["rank"]
        if adapter_id in seen:
            raise TinyModelError(f"{registry}: adapters[{i}].id {adapter_id!r} is duplicated")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise TinyModelError(f"{registry}: adapters[{i}].rank must be a positive integer")
        seen.add(adapter_id)
        path = (root / str(entry["path"])).resolve()
        _require_files(path, ("adapter_config.json", "adapter_model.safetensors"))
        adapters.append(TinyAdapter(adapter_id, rank, path))
    return TinyModel(root, base, tuple(adapters), registry)


def _require_files(directory: Path, names: Sequence[str]) -> None:
    for name in names:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing")


# ----------------------------------------------------------------------------- CLI
def _parse_ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ranks takes comma-separated integers, got {text!r}"
        ) from None
    if not ranks:
        raise argparse.ArgumentTypeError("--ranks needs at least one rank")
    return ranks


def add_parser(subparsers: Any) -> None:
    """Register `tiny-model OUT --adapters N --ranks 8,16 [--seed K] [--force]`."""
    p = subparsers.add_parser(
        "tiny-model",
        help="generate a tiny random Llama + LoRA adapters that vLLM (CPU) can serve",
        description="Write a tiny random-weight Llama (OUT/base), PEFT LoRA adapters "
        "(OUT/adapters/<id>) and a registry (OUT/adapters.yaml). No downloads; ~1 s.",
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--adapters", type=int, default=4, help="number of adapters (default 4)")
    p.add_argument("--ranks", type=_parse_ranks, default=(8, 16),
                   help="comma-separated LoRA ranks, assigned round-robin (default 8,16)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokenizer")
    p.add_argument("--force", action="store_true", help="replace a previous build in OUT")
    p.set_defaults(func=cmd_tiny_model)


def cmd_tiny_model(args: argparse.Namespace) -> int:
    """Build the tiny model and print a short summary; user errors exit 2 with a message."""
    from rich.console import Console

    console, err = Console(), Console(stderr=True)
    start = time.perf_counter()
    try:
        model = build_tiny_model(
            args.out, n_adapters=args.adapters, ranks=args.ranks,
            spec=TinyModelSpec(seed=args.seed), overwrite=args.force,
        )
    except (TinyModelError, FileExistsError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return 2
    elapsed = time.perf_counter() - start
    by_rank = Counter(a.rank for a in model.adapters)
    ranks_text = ", ".join(f"{n} x r{r}" for r, n in sorted(by_rank.items())) or "none"
    shown = model.adapters[:3]
    lora_modules = " ".join(f"{a.id}={a.path}" for a in shown)
    serve = (
        f"VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server "
        f"--model {model.base_path} --max-model-len 512"
    )
    if shown:
        # One max_loras slot spare: vllm-cpu 0.32.0 mixes up base requests when all are full.
        serve += (
            f" --enable-lora --max-loras {len(shown) + 1} "
            f"--max-lora-rank {_vllm_rank(max(a.rank for a in shown))} "
            f"--lora-modules {lora_modules}"
        )
    console.print(
        f"[bold]tiny model[/] written to {model.root} in {elapsed:.2f} s\n"
        f"  base      {model.base_path}\n"
        f"  adapters  {len(model.adapters)} ({ranks_text}) under {model.root / ADAPTERS_DIR}\n"
        f"  registry  {model.registry_path}\n"
        f"  serve     {serve}\n"
        f"  (serve line loads the first {len(shown)} adapter(s); see docs/tiny_model.md)",
        highlight=False, soft_wrap=True,
    )
    return 0


def _vllm_rank(rank: int) -> int:
    """Smallest value vLLM accepts for --max-lora-rank that fits `rank`."""
    return next(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)
