"""Step-time model: how long one engine step takes, from what the scheduler put in it.

Linear in its parameters, so it is fitted by (non-negative) least squares and extrapolates to batch
shapes the profiling sweeps never ran. The terms follow how a vLLM step runs on a GPU:

* ``const``                 per-step fixed cost: launches, sampling, output processing, schedule();
* ``prefill_tokens``        GEMM work of prompt tokens (compute bound);
* ``graph_decode_tokens``   decode rows of a step replayed as a CUDA graph (total tokens <=
                            ``cuda_graph_max_tokens``): the graph runs at its *padded* size
                            (1, 2, 4, then multiples of 8), so padding rows cost like real ones;
* ``eager_decode_seqs``, ``eager_const``: larger steps run eagerly, with a different per-row cost
                            and a jump;
* ``ctx_ktokens``           attention over the KV cache, per thousand context tokens attended;
* LoRA (vLLM's triton shrink/expand kernels), shaped after their launch grid, which is
  SPLIT_K x cdiv(tokens, 32) x cdiv(rank, 16) x slices x (max_loras + 1) thread blocks, blocks of
  slots without tokens exiting early (vllm/lora/ops/triton_ops/lora_shrink.py):
  ``lora_const``            fixed cost when LoRA is enabled;
  ``lora_ktokens``          real work: thousands of batched tokens x cdiv(max_lora_rank, 16)
                            (the shrink grid's rank dimension; weights are stacked at the slot
                            rank, not the adapter's own);
  ``lora_prefill_ktokens``  extra per thousand prompt tokens (the large-M kernel configuration);
  ``lora_slot_mtokens``     launched-and-exiting blocks: millions of tokens x (max_loras + 1), why
                            a replica with many slots pays for them even when few are in use
                            (the expand kernel's grid);
  ``lora_shrink_kctas``     thousands of shrink-kernel thread blocks: SPLIT_K x cdiv(M, 32) x
                            cdiv(rank, 16) x (max_loras + 1), where SPLIT_K is 64 below 128
                            tokens and 8 above (the kernel's own configuration), so a small batch
                            on a replica with many slots launches *more* blocks than a large one;
  ``lora_adapters``         per *distinct* adapter in the batch: each active adapter gets its own
                            thread blocks;
  ``lora_adapter_rank_tiles`` per distinct adapter x (cdiv(max_lora_rank, 16) - 1): the blocks
                            each further 16 ranks add. Apart from ``lora_adapters`` because the
                            adapter-loading sweep measures it directly (one adapter at slot ranks
                            8, 16 and 32) and it is cheaper than a whole adapter's blocks.

The reference sweeps vary adapters and slots only at rank 8; the rank factor cdiv(rank, 16)
(= 1 for ranks 8 and 16, 2 for 32, 4 for 64) comes from the kernels' block size (BLOCK_N = 16),
not from a fit, and the one-hour validation runs (ranks 16 and 32) test it.

Adapter loads are not in this model: their measured latencies are added per load
(``twin.profile.AdapterLoadTable``). Scheduler time is inside a measured step, so it is inside
``const`` and the per-sequence terms.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

FEATURES: tuple[str, ...] = (
    "const",
    "prefill_tokens",
    "graph_decode_tokens",
    "eager_decode_seqs",
    "eager_const",
    "ctx_ktokens",
    "lora_const",
    "lora_ktokens",
    "lora_prefill_ktokens",
    "lora_adapters",
    "lora_adapter_rank_tiles",
    "lora_slot_mtokens",
    "lora_shrink_kctas",
)
RANK_BLOCK = 16  # BLOCK_N of vLLM's LoRA shrink kernel: rank tiles per thread block


def rank_tiles(max_lora_rank: Any) -> Any:
    """cdiv(rank, 16): how many rank tiles the LoRA kernels launch per token block."""
    return np.ceil(np.asarray(max_lora_rank, dtype=float) / RANK_BLOCK)


SHRINK_BLOCK_M = 32
SHRINK_SMALL_M = 128  # below this many tokens the shrink kernel splits K 64 ways, else 8


def shrink_blocks(tokens: Any, max_lora_rank: Any, max_loras: Any) -> Any:
    """Thread blocks one LoRA shrink launch starts (vllm/lora/ops/triton_ops/lora_shrink.py)."""
    m = np.asarray(tokens, dtype=float)
    split_k = np.where(m < SHRINK_SMALL_M, 64.0, 8.0)
    return (
        split_k * np.ceil(m / SHRINK_BLOCK_M) * rank_tiles(max_lora_rank)
        * (np.asarray(max_loras, dtype=float) + 1)
    )


def cuda_graph_sizes(max_tokens: int) -> list[int]:
    """vLLM's default capture sizes up to ``max_tokens``: 1, 2, 4, then every multiple of 8."""
    if max_tokens <= 0:
        return []
    return [s for s in [1, 2, 4, *range(8, max_tokens + 1, 8)] if s <= max_tokens]


def padding_table(max_tokens: int) -> list[int]:
    """pad[t] = the graph size a step of t tokens runs at (t itself when above the graphs)."""
    sizes = cuda_graph_sizes(max_tokens)
    table = list(range(max_tokens + 1))
    j = 0
    for t in range(1, max_tokens + 1):
        while sizes[j] < t:
            j += 1
        table[t] = sizes[j]
    return table


@dataclass(frozen=True)
class StepTimeModel:
    """Coefficients in ms per unit of each feature (module docstring), plus the graph limit."""

    const: float = 0.0
    prefill_tokens: float = 0.0
    graph_decode_tokens: float = 0.0
    eager_decode_seqs: float = 0.0
    eager_const: float = 0.0
    ctx_ktokens: float = 0.0
    lora_const: float = 0.0
    lora_ktokens: float = 0.0
    lora_prefill_ktokens: float = 0.0
    lora_adapters: float = 0.0
    lora_adapter_rank_tiles: float = 0.0
    lora_slot_mtokens: float = 0.0
    lora_shrink_kctas: float = 0.0
    cuda_graph_max_tokens: int = 512  # 0: no CUDA graphs (CPU backend): every step is "eager"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"step_model.{f.name}: must be a finite number, got {value!r}")
        if self.cuda_graph_max_tokens < 0:
            raise ValueError("step_model.cuda_graph_max_tokens: must be >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "step_model") -> StepTimeModel:
        known = (*FEATURES, "cuda_graph_max_tokens")
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown coefficient(s) {unknown}; known: {list(known)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{where}.{k}: must be a number, got {v!r}")
            kw[k] = int(v) if k == "cuda_graph_max_tokens" else float(v)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f: round(float(getattr(self, f)), 8) for f in FEATURES}
        out["cuda_graph_max_tokens"] = self.cuda_graph_max_tokens
        return out

    def scaled(self, factor: float) -> StepTimeModel:
        """Every step ``factor`` times as long (all terms are linear in the coefficients)."""
        return StepTimeModel.from_vector(self.as_vector() * float(factor),
                                         self.cuda_graph_max_tokens)

    def as_vector(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in FEATURES], dtype=float)

    @classmethod
    def from_vector(cls, vec: np.ndarray, cuda_graph_max_tokens: int = 512) -> StepTimeModel:
        kw = {f: float(v) for f, v in zip(FEATURES, vec, strict=True)}
        return cls(**kw, cuda_graph_max_tokens=cuda_graph_max_tokens)

    def predict_ms(self, **batch: Any) -> np.ndarray:
        """Vectorised prediction (arguments of ``design_matrix``); engines call ``StepCost``,
        its scalar form."""
        return design_matrix(cuda_graph_max_tokens=self.cuda_graph_max_tokens, **batch) @ (
            self.as_vector()
        )


def design_matrix(
    *,
    prefill_tokens: Any,
    decode_seqs: Any,
    ctx_tokens: Any,
    lora_adapters: Any,
    lora_enabled: Any,
    max_lora_rank: Any,
    max_loras: Any,
    cuda_graph_max_tokens: int = 512,
) -> np.ndarray:
    """Rows of FEATURES per step: the one place where the features are defined."""
    p = np.atleast_1d(np.asarray(prefill_tokens, dtype=float))
    shape = p.shape

    def col(x: Any) -> np.ndarray:
        return np.broadcast_to(np.asarray(x, dtype=float), shape)

    d, k, a, on, r, g = (
        col(decode_seqs), col(ctx_tokens), col(lora_adapters), col(lora_enabled),
        col(max_lora_rank), col(max_loras),
    )
    t = p + d
    graph = (t <= cuda_graph_max_tokens) & (t > 0) if cuda_graph_max_tokens > 0 else t < 0
    if cuda_graph_max_tokens > 0:
        pad = np.asarray(padding_table(cuda_graph_max_tokens), dtype=float)
        tpad = np.where(graph, pad[np.clip(t, 0, cuda_graph_max_tokens).astype(int)], t)
    else:
        tpad = t
    eager = ~graph & (t > 0)
    return np.column_stack(
        [
            np.ones(shape),
            p,
            np.where(graph, tpad - p, 0.0),
            np.where(eager, d, 0.0),
            eager.astype(float),
            k / 1e3,
            on,
            on * t / 1e3 * rank_tiles(r),
            on * p / 1e3,
            on * a,
            on * a * (rank_tiles(r) - 1),
            on * t * (g + 1) / 1e6,
            on * shrink_blocks(tpad, r, g) / 1e3,
        ]
    )


@dataclass(frozen=True)
class StepCost:
    """The step-time model with one engine's configuration folded in: the scalar form of
    ``StepTimeModel.predict_ms`` that engines call once per step (the twin's engine and the
    live ``sim`` backend), so the formula lives here and nowhere else. ``ms`` equals
    ``predict_ms`` for every batch (``tests/test_latency.py``), plus what a step pays outside the
    model: adapter loads and the waiting requests the scheduler scanned past."""

    const: float
    prefill: float  # per prompt token (with the LoRA prefill term)
    ctx: float  # per context token attended
    adapter: float  # per distinct adapter in the batch
    token: float  # per batched token (LoRA rank tiles and launched slots)
    graph: float  # per padded decode row of a CUDA-graph step
    eager_seq: float  # per decode row of an eager step ...
    eager: float  # ... and the eager step's jump
    shrink: float  # per shrink-kernel row block, times the regime's split
    scan: float  # per waiting request examined and left waiting
    graph_max: int
    pad: tuple[int, ...]

    @classmethod
    def for_engine(cls, model: StepTimeModel, *, lora_enabled: bool, max_lora_rank: int,
                   max_loras: int, scan_us_per_waiting: float = 0.0) -> StepCost:
        tiles = float(rank_tiles(max_lora_rank))
        on = bool(lora_enabled)
        return cls(
            const=model.const + (model.lora_const if on else 0.0),
            prefill=model.prefill_tokens + (model.lora_prefill_ktokens / 1e3 if on else 0.0),
            ctx=model.ctx_ktokens / 1e3,
            adapter=(model.lora_adapters + model.lora_adapter_rank_tiles * (tiles - 1)
                     if on else 0.0),
            token=(model.lora_ktokens * tiles / 1e3
                   + model.lora_slot_mtokens * (max_loras + 1) / 1e6 if on else 0.0),
            graph=model.graph_decode_tokens,
            eager_seq=model.eager_decode_seqs,
            eager=model.eager_const,
            shrink=(model.lora_shrink_kctas / 1e3 * tiles * (max_loras + 1) if on else 0.0),
            scan=scan_us_per_waiting / 1e3,
            graph_max=model.cuda_graph_max_tokens,
            pad=tuple(padding_table(model.cuda_graph_max_tokens)),
        )

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """(coefficients, padded sizes) as ``twin.engine.step_time.step_ms``, the compiled twin
        of ``ms``, takes them."""
        coef = np.array([self.const, self.prefill, self.ctx, self.adapter, self.token,
                         self.graph, self.eager_seq, self.eager, self.shrink, self.scan,
                         float(self.graph_max)])
        return coef, np.asarray(self.pad, dtype=np.int64)

    def ms(self, prefill_tokens: int, decode_seqs: int, ctx_tokens: int, lora_adapters: int,
           load_ms: float = 0.0, scanned_left: int = 0) -> float:
        """One step's duration in ms: ``prefill_tokens`` prompt tokens and ``decode_seqs``
        decodes (both > 0 together), ``ctx_tokens`` attended, ``lora_adapters`` distinct
        adapters; plus adapter loads and ``scanned_left`` waiting requests scanned past."""
        total = prefill_tokens + decode_seqs
        ms = (self.const + self.prefill * prefill_tokens + self.ctx * ctx_tokens
              + self.adapter * lora_adapters + self.token * total + load_ms
              + self.scan * scanned_left)
        if total <= self.graph_max:
            rows = self.pad[total]
            ms += self.graph * (rows - prefill_tokens)
        else:
            rows = total
            ms += self.eager_seq * decode_seqs + self.eager
        if self.shrink:
            ms += self.shrink * (64 if rows < 128 else 8) * ((rows + 31) // 32)
        return ms
