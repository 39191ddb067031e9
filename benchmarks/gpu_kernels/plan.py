"""Pure parts of the LoRA-kernel sweep: what vLLM 0.8.5 launches, at which size, and the grid.

Everything here is stdlib-only so the test suite checks it without torch or Triton, and so the
numbers the harness reports (launch grids, padded sizes, thread blocks that do work) are the
same formulas the twin's step model uses (``twin/latency.py``).

Sources, vLLM 0.8.5 wheel:

* ``lora/ops/triton_ops/lora_shrink.py``: grid (SPLIT_K * cdiv(M, 32) * cdiv(rank, 16), slices,
  max_loras + 1), SPLIT_K 64 / BLOCK_K 256 below 128 tokens, else 8 / 32.
* ``lora/ops/triton_ops/lora_expand.py``: grid (cdiv(M, 64) * cdiv(max_N, 128), slices,
  max_loras + 1); thread blocks of a slot without tokens, or past a slice's width, exit early.
* ``lora/ops/triton_ops/lora_kernel_metadata.py``: tokens sorted by slot, unique slots,
  counts, start offsets; arrays sized max_loras + 1 (+2), unused entries -1 / 0.
* ``lora/layers.py``, ``lora/models.py``: vLLM wraps *every* linear layer of the model (and, for
  Llama, ``embed_tokens`` and ``lm_head``) whatever the adapters target; each wrapped linear
  runs ``PunicaWrapperGPU.add_lora_linear`` = fp32 zeros + shrink + expand.
* ``config.py`` (V1): CUDA-graph capture sizes 1, 2, 4, 8, 16, ..., 512 (<= the token budget);
  ``v1/worker/gpu_model_runner.py``: a step of <= 512 tokens runs its (piecewise) graph at the
  padded size, larger steps run eagerly; logits (``lm_head``) are computed outside the graph.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

# ------------------------------------------------------------------------- vLLM constants
MAX_NUM_BATCHED_TOKENS = 2048  # the reference runs' chunked-prefill budget (H100 < 70 GiB)
MAX_NUM_SEQS = 2048  # the one-hour runs' --max-num-seqs: sizes the logits metadata
GRAPH_MAX_TOKENS = 512  # V1's largest default capture size
LORA_EXTRA_VOCAB = 256  # LoRAConfig.lora_extra_vocab_size default
LORA_VOCAB_PADDING = 256  # LoRAConfig.lora_vocab_padding_size

SHRINK_BLOCK_M, SHRINK_BLOCK_N = 32, 16
EXPAND_BLOCK_M, EXPAND_BLOCK_N, EXPAND_BLOCK_K = 64, 128, 16
SHRINK_SMALL_M = 128  # below: SPLIT_K 64, BLOCK_K 256; else SPLIT_K 8, BLOCK_K 32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def capture_sizes(
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS, graph_max: int = GRAPH_MAX_TOKENS
) -> list[int]:
    """V1's default CUDA-graph batch sizes: 1, 2, 4, then multiples of 8 up to 512."""
    sizes = [1, 2, 4, *range(8, graph_max + 1, 8)]
    return [s for s in sizes if s <= min(max_num_batched_tokens, graph_max)]


def padded_tokens(tokens: int, graph_max: int = GRAPH_MAX_TOKENS) -> int:
    """Rows a step of ``tokens`` launches with: the next capture size, or itself when eager."""
    if tokens <= 0:
        raise ValueError("tokens must be >= 1")
    for s in capture_sizes(graph_max=graph_max):
        if s >= tokens:
            return s
    return tokens


def uses_cuda_graph(tokens: int, graph_max: int = GRAPH_MAX_TOKENS) -> bool:
    """Whether V1 replays a captured graph for a step of ``tokens`` tokens (else eager)."""
    return graph_max > 0 and tokens <= graph_max


# ------------------------------------------------------------------------- model shapes
@dataclass(frozen=True)
class LayerOp:
    """One LoRA-wrapped module: what vLLM launches for it each step, and how often."""

    name: str  # qkv_proj, o_proj, gate_up_proj, down_proj, embed_tokens, lm_head, metadata
    kind: str  # linear | embedding | logits | metadata
    in_features: int
    out_slices: tuple[int, ...]
    calls_per_step: int  # decoder layers for per-layer modules, 1 for model-level ones
    in_graph: bool  # inside the model forward (captured) or not (logits, metadata)

    @property
    def n_slices(self) -> int:
        return len(self.out_slices)

    @property
    def out_features(self) -> int:
        return sum(self.out_slices)

    @property
    def kernels(self) -> tuple[str, ...]:
        """Timed units: the call as vLLM makes it first, then its kernels alone."""
        return {
            "linear": ("add_lora_linear", "shrink", "expand"),
            "embedding": ("add_lora_embedding",),
            "logits": ("add_lora_logits", "extra_vocab"),
            "metadata": ("update_metadata",),
        }[self.kind]


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that size the LoRA launches (HF config of the model, bf16, TP 1)."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    org_vocab: int
    lora_embeddings: bool  # the vLLM model class lists embed_tokens/lm_head as LoRA modules

    @property
    def logits_width(self) -> int:
        """Columns of the logits (and of lm_head's lora_b): vocab + extra, padded to 256."""
        return cdiv(self.org_vocab + LORA_EXTRA_VOCAB, LORA_VOCAB_PADDING) * LORA_VOCAB_PADDING

    def ops(self) -> tuple[LayerOp, ...]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        ops = [
            LayerOp("qkv_proj", "linear", self.hidden, (q, kv, kv), self.layers, True),
            LayerOp("o_proj", "linear", q, (self.hidden,), self.layers, True),
            LayerOp("gate_up_proj", "linear", self.hidden, (self.intermediate,) * 2,
                    self.layers, True),
            LayerOp("down_proj", "linear", self.intermediate, (self.hidden,), self.layers, True),
        ]
        if self.lora_embeddings:
            ops.append(LayerOp("embed_tokens", "embedding", 0, (self.hidden,), 1, True))
            ops.append(LayerOp("lm_head", "logits", self.hidden, (self.logits_width,), 1, False))
        ops.append(LayerOp("metadata", "metadata", 0, (), 1, False))
        return tuple(ops)

    def op(self, name: str) -> LayerOp:
        for o in self.ops():
            if o.name == name:
                return o
        raise KeyError(f"{self.name}: no LoRA op {name!r}")


MODELS: dict[str, ModelSpec] = {
    # Llama-3.1-8B-Instruct: LlamaForCausalLM lists embed_tokens/lm_head as embedding modules
    "llama-3.1-8b-instruct": ModelSpec(
        "llama-3.1-8b-instruct", 4096, 14336, 32, 8, 128, 32, 128256, True
    ),
    # Qwen2.5-7B-Instruct: Qwen2ForCausalLM has no embedding_modules in 0.8.5
    "qwen-2.5-7b-instruct": ModelSpec(
        "qwen-2.5-7b-instruct", 3584, 18944, 28, 4, 128, 28, 152064, False
    ),
    # CPU check under Triton's interpreter: the same structure (GQA qkv with unequal slices,
    # two-slice gate_up, embedding and logits LoRA), tiny sizes
    "tiny": ModelSpec("tiny", 64, 256, 2, 1, 32, 2, 128, True),
}


# ------------------------------------------------------------------------- token metadata
def slot_of_adapter(j: int, adapters: int, max_loras: int) -> int:
    """GPU slot of the batch's j-th adapter: spread over the slots (the LRU leaves them there)."""
    if not 0 <= j < adapters <= max_loras:
        raise ValueError(f"adapter {j} of {adapters} does not fit {max_loras} slots")
    return j * max_loras // adapters


def step_requests(tokens: int, mix: str) -> tuple[int, int]:
    """(decode requests, prefill-chunk tokens) of a step: all decodes, or half a chunk."""
    if mix == "decode":
        return tokens, 0
    if mix == "mixed":
        chunk = tokens // 2
        if chunk < 1 or tokens - chunk < 1:
            raise ValueError("a mixed step needs >= 2 tokens")
        return tokens - chunk, chunk
    raise ValueError(f"unknown mix {mix!r}: decode or mixed")


def token_slots(tokens: int, adapters: int, max_loras: int, mix: str = "decode") -> list[int]:
    """Slot of every token, in batch order, as V1's make_lora_inputs + convert_mapping give it.

    Decode requests take the adapters round-robin (one token each, like vLLM's own dummy run);
    a mixed step adds one prefill chunk (half the tokens) of the first adapter at the end.
    """
    decodes, chunk = step_requests(tokens, mix)
    if adapters < 1 or adapters > min(max_loras, decodes + (1 if chunk else 0)):
        raise ValueError(f"{adapters} adapters do not fit {tokens} tokens / {max_loras} slots")
    slots = [slot_of_adapter(i % adapters, adapters, max_loras) for i in range(decodes)]
    return slots + [slot_of_adapter(0, adapters, max_loras)] * chunk


def request_slots(tokens: int, adapters: int, max_loras: int, mix: str = "decode") -> list[int]:
    """Slot of every *request* (the rows the logits are computed for)."""
    decodes, chunk = step_requests(tokens, mix)
    slots = [slot_of_adapter(i % adapters, adapters, max_loras) for i in range(decodes)]
    return slots + ([slot_of_adapter(0, adapters, max_loras)] if chunk else [])


@dataclass(frozen=True)
class KernelMeta:
    """What ``LoRAKernelMeta.prepare_tensors`` computes, in plain lists (the test's reference)."""

    token_indices_sorted: list[int]
    lora_ids: list[int]  # max_loras + 1 entries, unused = -1
    num_tokens_per_lora: list[int]  # max_loras + 1 entries, unused = 0
    lora_token_start_loc: list[int]  # max_loras + 2 entries

    @property
    def active(self) -> list[tuple[int, int]]:
        """(slot, tokens) of the slots that have tokens."""
        return [(s, n) for s, n in zip(self.lora_ids, self.num_tokens_per_lora, strict=True)
                if s != -1]


def kernel_metadata(slots: Sequence[int], max_loras: int) -> KernelMeta:
    """Stable sort of tokens by slot, unique slots with counts and cumulative start offsets."""
    order = sorted(range(len(slots)), key=lambda i: slots[i])
    tally = Counter(slots)
    ids = sorted(tally)
    counts = [tally[i] for i in ids]
    pad = max_loras + 1 - len(ids)
    if pad < 0:
        raise ValueError(f"{len(ids)} distinct slots exceed max_loras={max_loras} (+ no-LoRA)")
    starts = [0, *itertools.accumulate(counts)]
    return KernelMeta(
        token_indices_sorted=order,
        lora_ids=ids + [-1] * pad,
        num_tokens_per_lora=counts + [0] * pad,
        lora_token_start_loc=starts + [0] * (max_loras + 2 - len(starts)),
    )


# ------------------------------------------------------------------------- launch grids
@dataclass(frozen=True)
class Launch:
    """One Triton launch: its grid, the config vLLM picks, and the blocks that do work."""

    kernel: str  # shrink | expand
    grid: tuple[int, int, int]
    config: dict[str, int]
    active_blocks: int

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def shrink_launch(
    m: int, rank: int, n_slices: int, max_loras: int, counts: Sequence[int] = ()
) -> Launch:
    """``_lora_shrink``'s launch for M rows; ``counts`` = tokens per active slot."""
    small = m < SHRINK_SMALL_M
    split_k, block_k = (64, 256) if small else (8, 32)
    n_tiles = cdiv(rank, SHRINK_BLOCK_N)
    grid = (split_k * cdiv(m, SHRINK_BLOCK_M) * n_tiles, n_slices, max_loras + 1)
    active = sum(cdiv(c, SHRINK_BLOCK_M) for c in counts if c > 0) * split_k * n_tiles * n_slices
    cfg = {"BLOCK_M": SHRINK_BLOCK_M, "BLOCK_N": SHRINK_BLOCK_N, "BLOCK_K": block_k,
           "SPLIT_K": split_k}
    return Launch("shrink", grid, cfg, active)


def expand_launch(
    m: int, rank: int, out_slices: Sequence[int], max_loras: int, counts: Sequence[int] = ()
) -> Launch:
    """``_lora_expand``'s launch; blocks past a narrower slice's width exit early."""
    del rank  # K = rank is looped over inside a block (BLOCK_K 16), not in the grid
    max_n = max(out_slices)
    grid = (cdiv(m, EXPAND_BLOCK_M) * cdiv(max_n, EXPAND_BLOCK_N), len(out_slices), max_loras + 1)
    n_blocks = sum(cdiv(n, EXPAND_BLOCK_N) for n in out_slices)
    active = sum(cdiv(c, EXPAND_BLOCK_M) for c in counts if c > 0) * n_blocks
    cfg = {"BLOCK_M": EXPAND_BLOCK_M, "BLOCK_N": EXPAND_BLOCK_N, "BLOCK_K": EXPAND_BLOCK_K}
    return Launch("expand", grid, cfg, active)


# ------------------------------------------------------------------------- the sweep
KERNEL_TIERS = ("add_lora_linear", "add_lora_embedding", "add_lora_logits", "extra_vocab",
                "update_metadata")  # the calls as vLLM makes them; shrink/expand come last


@dataclass(frozen=True)
class Cell:
    """One timed unit: a kernel (or vLLM call) of one op at one batch shape."""

    model: str
    op: str
    kernel: str
    mix: str
    tokens: int
    adapters: int
    max_loras: int
    rank: int  # max_lora_rank: the slot rank the weights are stacked at (0 for metadata)
    graph_max: int = GRAPH_MAX_TOKENS
    tier: int = 0

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    @property
    def layer(self) -> LayerOp:
        return self.spec.op(self.op)

    @property
    def cuda_graph(self) -> bool:
        return self.layer.in_graph and uses_cuda_graph(self.tokens, self.graph_max)

    @property
    def rows(self) -> int:
        """M the kernels launch with: padded tokens under a graph, requests for the logits."""
        if self.layer.kind == "logits":
            return len(request_slots(self.tokens, self.adapters, self.max_loras, self.mix))
        if self.layer.kind == "metadata":
            return self.tokens
        return padded_tokens(self.tokens, self.graph_max) if self.cuda_graph else self.tokens

    def slots(self) -> list[int]:
        """Slot per row the metadata is built from (real tokens, or requests for logits)."""
        if self.layer.kind == "logits":
            return request_slots(self.tokens, self.adapters, self.max_loras, self.mix)
        return token_slots(self.tokens, self.adapters, self.max_loras, self.mix)

    def launches(self) -> list[Launch]:
        """The Triton launches of one call (empty for torch-only / host-only units)."""
        return list(_launches(self))

    def _compute_launches(self) -> tuple[Launch, ...]:
        lay = self.layer
        if self.kernel in ("update_metadata", "extra_vocab"):
            return ()
        counts = [n for _, n in kernel_metadata(self.slots(), self.max_loras).active]
        m = self.rows
        shrink = shrink_launch(m, self.rank, max(lay.n_slices, 1), self.max_loras, counts)
        expand = expand_launch(m, self.rank, lay.out_slices, self.max_loras, counts)
        return {
            "add_lora_linear": (shrink, expand),
            "add_lora_logits": (shrink, expand),
            "shrink": (shrink,),
            "expand": (expand,),
            "add_lora_embedding": (expand,),
        }.get(self.kernel, ())

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        """LoRA weight bytes one call reads (active adapters' A and B at the slot rank)."""
        lay, a, r = self.layer, self.adapters, self.rank
        a_bytes = a * r * lay.in_features * lay.n_slices * dtype_bytes
        b_bytes = a * r * lay.out_features * dtype_bytes
        if self.kernel in ("add_lora_linear", "add_lora_logits"):
            return a_bytes + b_bytes
        if self.kernel == "shrink":
            return a_bytes
        if self.kernel in ("expand", "add_lora_embedding"):
            return b_bytes
        if self.kernel == "extra_vocab":  # all slots' extra-vocab embeddings, not just active
            return self.max_loras * LORA_EXTRA_VOCAB * self.spec.hidden * dtype_bytes
        return 0

    @property
    def group(self) -> tuple[str, str, str, int, int]:
        """Cells sharing weight buffers (allocated once per group)."""
        part = "extra_vocab" if self.kernel == "extra_vocab" else "lora"
        return (self.model, self.op, part, self.rank, self.adapters)


@functools.cache
def _launches(cell: Cell) -> tuple[Launch, ...]:
    return cell._compute_launches()


@dataclass(frozen=True)
class GridSpec:
    """The sweep's axes; ``build_plan`` drops what vLLM could not run or the issue did not ask."""

    models: tuple[str, ...] = ("llama-3.1-8b-instruct", "qwen-2.5-7b-instruct")
    tokens: tuple[int, ...] = (1, 16, 64, 128, 256, 384, 512, 768, 1024, 2048)
    adapters: tuple[int, ...] = (1, 8, 32, 128)
    max_loras: tuple[int, ...] = (8, 32, 128, 384)
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    mixed_tokens: tuple[int, ...] = (1024,)  # also timed as a mixed (prefill+decode) step
    max_slot_rank: int = 6144  # drop max_loras x rank above this (384 x 16; vLLM OOMs above)
    kernels: tuple[str, ...] = ()  # empty = every kernel of every op
    ops: tuple[str, ...] = ()  # empty = every op of the model
    split_ranks: tuple[int, ...] = (16,)  # shrink/expand timed alone only at these ranks
    split_ops: tuple[str, ...] = ()  # ... and for these ops (empty = every linear op)
    graph_max: int = GRAPH_MAX_TOKENS

    def with_(self, **kw: object) -> GridSpec:
        return replace(self, **kw)  # type: ignore[arg-type]


# the CPU grid (Triton interpreter): every unit once as a graph-padded step (121 -> 128 rows),
# an eager one and a mixed one (shrink/expand alone for one op). Graphs "up to 128" here so the
# padded step has >= 128 rows: the shrink then splits K 8 ways, not 64, which the interpreter
# runs several times faster (the 64-way path and padding below 128 rows are in the check).
CPU_GRID = GridSpec(
    models=("tiny",), tokens=(121, 160), adapters=(2,), max_loras=(3,), ranks=(16,),
    mixed_tokens=(160,), max_slot_rank=10**9, kernels=(), split_ranks=(16,),
    split_ops=("o_proj",), graph_max=128,
)


def tier_of(kernel: str, tokens: int, max_loras: int, rank: int, mix: str) -> int:
    """Run order: the issue's question first (decode 256-1,024 at 8-128 slots, ranks <= 32)."""
    if kernel not in KERNEL_TIERS:
        return 3
    core = 256 <= tokens <= 1024 and max_loras <= 128 and rank <= 32 and mix == "decode"
    return 0 if core else (1 if mix == "decode" else 2)


def build_plan(spec: GridSpec) -> list[Cell]:
    """Every valid cell of ``spec``, in run order (tier, then weight group)."""
    cells: list[Cell] = []
    for model in spec.models:
        ms = MODELS[model]
        for op in ms.ops():
            if spec.ops and op.name not in spec.ops:
                continue
            for kernel in op.kernels:
                if spec.kernels and kernel not in spec.kernels:
                    continue
                ranks = (0,) if op.kind == "metadata" else spec.ranks
                if kernel in ("shrink", "expand"):
                    if spec.split_ops and op.name not in spec.split_ops:
                        continue
                    ranks = tuple(r for r in ranks if r in spec.split_ranks)
                for rank, g, t, a in itertools.product(
                    ranks, spec.max_loras, spec.tokens, spec.adapters
                ):
                    if rank and g * rank > spec.max_slot_rank:
                        continue
                    mixes = ["decode"] + (["mixed"] if t in spec.mixed_tokens else [])
                    for mix in mixes:
                        if mix == "mixed" and t < 2:
                            continue
                        decodes, chunk = step_requests(t, mix)
                        if a > g or a > decodes + (1 if chunk else 0):
                            continue
                        tier = tier_of(kernel, t, g, rank, mix)
                        cells.append(Cell(model, op.name, kernel, mix, t, a, g, rank,
                                          spec.graph_max, tier))
    order = {m: i for i, m in enumerate(spec.models)}
    cells.sort(key=lambda c: (c.tier, order[c.model], c.op, c.rank, c.adapters, c.kernel,
                              c.max_loras, c.mix, c.tokens))
    return cells


# ------------------------------------------------------------------------- time estimate
@dataclass(frozen=True)
class CostModel:
    """Seconds a measurement takes on the GPU machine (assumptions, see the sweep doc).

    Not the kernels' time: the harness's own cost per measurement, so a plan can be sized to a
    device budget before it runs. Per call: ``launch_us`` per Triton launch (plus early-exit
    blocks and weight traffic) on the GPU, ``host_us`` per launch in Python when eager.
    """

    launch_us: float = 6.0
    block_ns: float = 1.0  # per launched thread block (most exit at once)
    hbm_gbps: float = 2500.0
    host_us: float = 45.0  # custom op + asserts + Triton launcher, per launch
    graph_setup_s: float = 0.006  # zeros/meta + capture + instantiate, plus per captured call:
    graph_capture_us: float = 60.0
    eager_setup_s: float = 0.002
    group_setup_s: float = 0.03  # weights of one (model, op, rank, adapters): allocate + fill
    metadata_s: float = 0.004  # one update_metadata (host, with a sync)
    compile_s: float = 2.0  # per Triton specialization compiled on a cold cache
    warmup: int = 3
    repeats: int = 10
    eager_repeats: int = 6
    min_calls: int = 2
    max_calls: int = 16
    l2_target_bytes: int = 160 << 20  # weights cycled per replay: well past H100's 50 MB L2

    def calls(self, cell: Cell) -> int:
        """Distinct weight copies cycled per repeat (capped at the model's layers)."""
        b = max(cell.weight_bytes(), 1)
        cap = min(self.max_calls, max(cell.layer.calls_per_step, self.min_calls))
        return max(self.min_calls, min(cap, math.ceil(self.l2_target_bytes / b)))

    def gpu_us(self, cell: Cell) -> float:
        """Rough GPU time of one call (for the estimate only)."""
        launches = cell.launches()
        t = sum(self.launch_us + la.blocks * self.block_ns / 1e3 for la in launches)
        t += cell.weight_bytes() / (self.hbm_gbps * 1e3)
        if cell.kernel == "extra_vocab":
            t += 20.0 + cell.weight_bytes() / (self.hbm_gbps * 1e3)
        return t

    def seconds(self, cell: Cell) -> float:
        if cell.kernel == "update_metadata":
            return (self.warmup + self.repeats) * self.metadata_s
        n, gpu = self.calls(cell), self.gpu_us(cell)
        launches = max(len(cell.launches()), 1)
        if cell.cuda_graph:
            setup = self.graph_setup_s + n * launches * self.graph_capture_us / 1e6
            return setup + (self.warmup + self.repeats) * n * gpu / 1e6
        per_call = max(gpu, launches * self.host_us)
        return self.eager_setup_s + (1 + self.eager_repeats) * n * per_call / 1e6


def specializations(cells: Iterable[Cell]) -> int:
    """Distinct Triton compilations the plan needs (constexprs + 16-divisibility of ints)."""
    keys: set[tuple[object, ...]] = set()
    for c in cells:
        lay = c.layer
        for la in c.launches():
            m = c.rows
            if la.kernel == "shrink":
                keys.add(("shrink", la.config["SPLIT_K"], max(lay.n_slices, 1), m % 16 == 0,
                          m == 1, c.rank % 16 == 0))
            else:
                same = len(set(lay.out_slices)) == 1
                keys.add(("expand", lay.n_slices, same, m % 16 == 0, m == 1, c.rank % 16 == 0,
                          c.kernel == "add_lora_embedding"))
    return len(keys)


def estimate_seconds(cells: Sequence[Cell], cost: CostModel | None = None) -> dict[str, float]:
    """Plan duration on the GPU: measurements + cold Triton compiles + a fixed start-up."""
    cost = cost or CostModel()
    measure = sum(cost.seconds(c) for c in cells)
    measure += len({(c.tier, c.group) for c in cells}) * cost.group_setup_s
    compile_s = specializations(cells) * cost.compile_s
    startup = 45.0  # torch import, CUDA context, preflight check (≈ 15 cold compiles)
    return {"measure_s": measure, "compile_s": compile_s, "startup_s": startup,
            "total_s": measure + compile_s + startup}


def summarize(cells: Sequence[Cell]) -> dict[str, object]:
    """Counts per axis, for the log and the provenance file."""
    def uniq(attr: str) -> list[object]:
        return sorted({getattr(c, attr) for c in cells})  # type: ignore[type-var]

    return {
        "cells": len(cells),
        "per_tier": {t: sum(1 for c in cells if c.tier == t) for t in uniq("tier")},
        "per_kernel": {k: sum(1 for c in cells if c.kernel == k) for k in uniq("kernel")},
        "graph_cells": sum(1 for c in cells if c.cuda_graph),
        **{a: uniq(a) for a in ("model", "op", "mix", "tokens", "adapters", "max_loras", "rank")},
    }


@dataclass
class Budget:
    """Stops the sweep cleanly: no measurement starts that would end past ``limit_s``."""

    limit_s: float
    started_s: float
    spent: list[float] = field(default_factory=list)

    def allows(self, now_s: float, next_estimate_s: float) -> bool:
        return now_s - self.started_s + next_estimate_s <= self.limit_s
