"""The LoRA calls as vLLM 0.8.5 makes them, checked against torch and timed, under a budget.

GPU: bf16 like the served models; steps of <= 512 tokens are captured in a CUDA graph at the
padded size and timed by replaying it (V1's piecewise graphs hold the LoRA launches), larger
ones are launched eagerly and timed with CUDA events (host launch gaps included, the host's
issue time reported alongside). CPU: the same code under TRITON_INTERPRET=1 on tiny shapes,
fp16 (Triton 3.2's interpreter mishandles bf16), one untimed-quality call per row: it proves
shapes, grids and the table, not speed.

Weights: only the batch's active adapters are allocated (vLLM stacks ``max_loras`` slots, but a
kernel touches only the slots in its metadata, and strides do not depend on the slot count), as
``calls`` distinct copies cycled per repeat so they stream from HBM like 32 distinct layers do.
Kernel metadata ids are the active slots renumbered 0..adapters-1 in slot order: the sort, the
counts and the grid are unchanged; ``update_metadata`` uses the real spread slot positions.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpu_kernels import plan as P
from gpu_kernels.source import Kernels
from gpu_kernels.table import COLUMN_NAMES, columns_markdown

Call = Callable[[int], None]


@dataclass
class Settings:
    """How to run: device, dtype, repeats, budget, output folder."""

    device: str = "cuda"
    out_dir: Path = Path("out/gpu_lora_kernels")
    budget_s: float = 400.0
    cost: P.CostModel = field(default_factory=P.CostModel)
    seed: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float16

    @property
    def timing_name(self) -> str:
        return "cpu_interpreter" if self.device == "cpu" else ""


MAX_ERROR_STREAK = 100  # e.g. a poisoned CUDA context: every later cell would fail too
CPU_COST = P.CostModel(warmup=0, repeats=1, eager_repeats=1, min_calls=1, max_calls=1)


# ------------------------------------------------------------------------- the vLLM calls
def compact_ids(slots: Sequence[int]) -> list[int]:
    """Active slots renumbered 0..n-1 in slot order (the order the kernels sort by)."""
    rank = {s: i for i, s in enumerate(sorted(set(slots)))}
    return [rank[s] for s in slots]


class OpBuffers:
    """Weights (``copies`` distinct sets) and activations of one (model, op, rank, adapters)."""

    def __init__(self, cell: P.Cell, copies: int, rows: int, max_loras: int,
                 dtype: torch.dtype, device: str, gen: torch.Generator,
                 weight_scale: float = 0.05) -> None:
        lay, a, r = cell.layer, cell.adapters, cell.rank
        w = weight_scale
        self.copies, self.lay = copies, lay

        def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
            """Seeded on CPU; on GPU drawn in place (GBs at slot rank 64), seeded by torch."""
            if device == "cpu":
                return (torch.randn(*shape, generator=gen) * scale).to(dtype)
            return torch.randn(*shape, dtype=dtype, device=device).mul_(scale)

        rows = max(rows, 1)
        self.lora_a: list[Any] = []
        self.lora_b: list[Any] = []
        if lay.kind == "linear":
            for _ in range(copies):
                self.lora_a.append(tuple(rand(a, 1, r, lay.in_features, scale=w)
                                         for _ in lay.out_slices))
                self.lora_b.append(tuple(rand(a, 1, n, r, scale=w) for n in lay.out_slices))
            self.x = rand(rows, lay.in_features)
            self.y = rand(rows, lay.out_features)
            self.buf = torch.zeros(lay.n_slices, rows, r, dtype=torch.float32, device=device)
        elif lay.kind == "embedding":
            for _ in range(copies):
                self.lora_b.append(rand(a, 1, lay.out_features, r, scale=w))
            self.x = rand(rows, r)  # F.embedding(lora_a_stacked_2d) rows
            self.y = rand(rows, lay.out_features)
        elif lay.kind == "logits":
            hidden = cell.spec.hidden
            if cell.kernel == "add_lora_logits":
                for _ in range(copies):
                    self.lora_a.append(rand(a, 1, r, hidden, scale=w))
                    self.lora_b.append(rand(a, 1, lay.out_features, r, scale=w))
            else:  # extra_vocab: every slot's extra-vocabulary embeddings
                self.emb = [rand(max_loras, P.LORA_EXTRA_VOCAB, hidden, scale=0.05)
                            for _ in range(copies)]
            self.x = rand(rows, hidden)
            self.y = rand(rows, lay.out_features)


def make_call(k: Kernels, cell: P.Cell, bufs: OpBuffers, metas: dict[str, Any],
              device: str, dtype: torch.dtype) -> Call:
    """One call of the unit on weight copy ``c``, exactly as vLLM's wrapper makes it."""
    lay, m, r = cell.layer, cell.rows, cell.rank
    if cell.kernel in ("add_lora_linear", "shrink", "expand"):
        meta = metas["token"]
        x, y, buf = bufs.x[:m], bufs.y[:m], bufs.buf[:, :m]
        if cell.kernel == "add_lora_linear":
            def call(c: int) -> None:  # PunicaWrapperGPU.add_lora_linear (no bias)
                tmp = torch.zeros((lay.n_slices, m, r), dtype=torch.float32, device=device)
                k.shrink(x, bufs.lora_a[c], tmp, *meta.meta_args(m), 1.0)
                k.expand(tmp, bufs.lora_b[c], y, *meta.meta_args(m), offset_start=0,
                         add_inputs=True)
        elif cell.kernel == "shrink":
            buf = buf.contiguous()

            def call(c: int) -> None:
                k.shrink(x, bufs.lora_a[c], buf, *meta.meta_args(m), 1.0)
        else:
            buf = buf.contiguous()

            def call(c: int) -> None:
                k.expand(buf, bufs.lora_b[c], y, *meta.meta_args(m), offset_start=0,
                         add_inputs=True)
        return call
    if cell.kernel == "add_lora_embedding":
        meta = metas["token"]
        xr, y = bufs.x[:m], bufs.y[:m]

        def call(c: int) -> None:  # PunicaWrapperGPU.add_lora_embedding
            k.expand(xr.unsqueeze(dim=0), (bufs.lora_b[c],), y, *meta.meta_args(m),
                     offset_start=0, add_inputs=True)
        return call
    if cell.kernel == "add_lora_logits":
        meta = metas["prompt"]
        h, logits = bufs.x[:m], bufs.y[:m]

        def call(c: int) -> None:  # PunicaWrapperGPU.add_lora_logits
            buffer = torch.zeros((m, r), dtype=torch.float32, device=device)
            k.shrink(h, [bufs.lora_a[c]], buffer.unsqueeze(dim=0), *meta.meta_args(m), 1.0)
            k.expand(buffer.unsqueeze(dim=0), [bufs.lora_b[c]], logits, *meta.meta_args(m),
                     add_inputs=True)
        return call
    if cell.kernel == "extra_vocab":
        g, org = cell.max_loras, cell.spec.org_vocab
        h, logits = bufs.x[:m], bufs.y[:m]
        slots = cell.slots()
        idx = torch.tensor([i + s * m for i, s in enumerate(slots)], dtype=torch.long,
                           device=device)  # convert_mapping's sampler_indices_padded

        def call(c: int) -> None:  # LogitsProcessorWithLoRA._get_logits, LoRA part
            emb = bufs.emb[c][:g]
            lora_logits = torch.empty(g + 1, emb.shape[1], m, dtype=dtype, device=device)
            torch.matmul(emb, h.T, out=lora_logits[:-1])
            lora_logits[-1] = float("-inf")
            lora_logits = lora_logits.mT
            lora_logits = lora_logits.reshape(
                lora_logits.shape[0] * lora_logits.shape[1], lora_logits.shape[2]
            ).index_select(0, idx).nan_to_num_(nan=float("-inf"), posinf=float("inf"),
                                              neginf=float("-inf"))
            logits[:, org:org + lora_logits.shape[1]] = lora_logits
        return call
    raise ValueError(f"no call for kernel {cell.kernel!r}")


def build_metas(k: Kernels, cell: P.Cell, device: str) -> dict[str, Any]:
    """vLLM's LoRAKernelMeta for the step's tokens (and requests), via its prepare_tensors."""
    metas: dict[str, Any] = {}
    g = cell.max_loras
    if cell.layer.kind == "logits":
        meta = k.meta_cls.make(g, P.MAX_NUM_SEQS, device=device)
        meta.prepare_tensors(torch.tensor(compact_ids(cell.slots()), dtype=torch.long,
                                          device=device))
        metas["prompt"] = meta
    else:
        meta = k.meta_cls.make(g, P.MAX_NUM_BATCHED_TOKENS, device=device)
        meta.prepare_tensors(torch.tensor(compact_ids(cell.slots()), dtype=torch.long,
                                          device=device))
        metas["token"] = meta
    return metas


def metadata_call(k: Kernels, cell: P.Cell, device: str) -> Callable[[], None]:
    """PunicaWrapperGPU.update_metadata for the step (host work + the sync it implies)."""
    spec, g, t = cell.spec, cell.max_loras, cell.tokens
    tok = cell.slots()
    req = P.request_slots(t, cell.adapters, g, cell.mix)
    lora_index_to_id: list[int | None] = [None] * g
    for s in sorted(set(tok)):
        lora_index_to_id[s] = s + 1  # lora_int_id of the adapter in slot s
    mapping = types.SimpleNamespace(index_mapping=tuple(s + 1 for s in tok),
                                    prompt_mapping=tuple(s + 1 for s in req), is_prefill=True)
    n_tok, n_req = P.MAX_NUM_BATCHED_TOKENS, P.MAX_NUM_SEQS
    token_idx = torch.empty(n_tok, dtype=torch.long, device=device)
    sampler_idx = torch.empty(n_req, dtype=torch.long, device=device)
    sampler_pad = torch.empty(n_req, dtype=torch.long, device=device)
    emb_idx = torch.empty(2, n_tok, dtype=torch.long, device=device)
    token_meta = k.meta_cls.make(g, n_tok, device=device)
    prompt_meta = k.meta_cls.make(g, n_req, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call() -> None:
        base, sampler, padded, emb, _, _ = k.convert_mapping(
            mapping, lora_index_to_id, g, spec.org_vocab, P.LORA_EXTRA_VOCAB, device)
        token_idx[:base.shape[0]].copy_(base)
        sampler_idx[:sampler.shape[0]].copy_(sampler)
        sampler_pad[:padded.shape[0]].copy_(padded)
        emb_idx[:emb.shape[0], :emb.shape[1]].copy_(emb)
        token_meta.prepare_tensors(token_idx[:base.shape[0]])
        prompt_meta.prepare_tensors(sampler_idx[:sampler.shape[0]])
        sync()
    return call


# ------------------------------------------------------------------------- reference check
def reference(cell: P.Cell, bufs: OpBuffers, y0: torch.Tensor, c: int = 0) -> torch.Tensor:
    """The LoRA math in fp32: y += (x @ A[slot]^T) @ B[slot]^T per token, slice by slice."""
    lay, m = cell.layer, cell.rows
    ids = compact_ids(cell.slots())
    out = y0.float().clone()
    n = len(ids)  # real rows; padded rows (graph) get nothing
    if lay.kind == "embedding":
        xr = bufs.x[:n].float()
        b = bufs.lora_b[c].float()[:, 0]
        for i, a in enumerate(ids):
            out[i] += b[a] @ xr[i]
        return out
    x = bufs.x[:m].float()
    a_list = [bufs.lora_a[c]] if lay.kind == "logits" else list(bufs.lora_a[c])
    b_list = [bufs.lora_b[c]] if lay.kind == "logits" else list(bufs.lora_b[c])
    col = 0
    for a_w, b_w in zip(a_list, b_list, strict=True):
        a_f, b_f = a_w.float()[:, 0], b_w.float()[:, 0]
        width = b_f.shape[1]
        for i, a in enumerate(ids):
            out[i, col:col + width] += b_f[a] @ (a_f[a] @ x[i])
        col += width
    return out


@dataclass
class CheckResult:
    cell: str
    max_abs_err: float
    tolerance: float
    lora_delta: float  # max |reference - input|: what the LoRA adds (a no-op would err by it)
    padded_rows_untouched: bool
    grids_ok: bool
    grids: list[tuple[int, int, int]]
    expected_grids: list[tuple[int, int, int]]

    @property
    def ok(self) -> bool:
        return (self.max_abs_err <= self.tolerance < self.lora_delta / 10
                and self.padded_rows_untouched and self.grids_ok)


class _GridRecorder:
    """Stands in for a @triton.jit kernel in its module: records each launch grid."""

    def __init__(self, kernel: Any, grids: list[tuple[int, int, int]]) -> None:
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid: Any) -> Any:
        self.grids.append(tuple(int(g) for g in grid))  # type: ignore[arg-type]
        return self.kernel[grid]


def check_cell(k: Kernels, cell: P.Cell, device: str, dtype: torch.dtype,
               gen: torch.Generator) -> CheckResult:
    """Run the vLLM call once and compare with ``reference``; record the launch grids."""
    k.clear_pointer_caches()
    bufs = OpBuffers(cell, 1, cell.rows, cell.max_loras, dtype, device, gen, weight_scale=0.3)
    metas = build_metas(k, cell, device)
    call = make_call(k, cell, bufs, metas, device, dtype)
    y0 = bufs.y.clone()
    grids: list[tuple[int, int, int]] = []
    mods = {"_lora_shrink_kernel": k.modules["vllm.lora.ops.triton_ops.lora_shrink"],
            "_lora_expand_kernel": k.modules["vllm.lora.ops.triton_ops.lora_expand"]}
    originals = {name: getattr(mod, name) for name, mod in mods.items()}
    try:
        for name, mod in mods.items():
            setattr(mod, name, _GridRecorder(originals[name], grids))
        call(0)
    finally:
        for name, mod in mods.items():
            setattr(mod, name, originals[name])
    if device == "cuda":
        torch.cuda.synchronize()
    ref = reference(cell, bufs, y0)
    got = bufs.y[:cell.rows].float()
    err = float((got - ref[:cell.rows]).abs().max())
    scale = float(ref.abs().max())
    tol = (0.03 if dtype == torch.bfloat16 else 0.01) * max(1.0, scale)
    delta = float((ref - y0.float()).abs().max())
    real = len(cell.slots())
    untouched = bool(torch.equal(bufs.y[real:cell.rows], y0[real:cell.rows]))
    expected = [la.grid for la in cell.launches()]
    name = (f"{cell.model}/{cell.op}/{cell.kernel} {cell.mix} tokens={cell.tokens} "
            f"rows={cell.rows} adapters={cell.adapters} max_loras={cell.max_loras} "
            f"rank={cell.rank}")
    k.clear_pointer_caches()
    return CheckResult(name, err, tol, delta, untouched, grids == expected, grids, expected)


def check_cells(model: str, graph_max: int) -> list[P.Cell]:
    """Cases covering every code path of the kernels: 1, 2 and 3 slices (qkv's unequal ones),
    rank 8 (expand's uneven K) and 16, SPLIT_K 64 and 8 (below / from 128 rows), shrink's even
    K (down_proj at >= 128 rows: K = 256), rows padded for a graph (5 -> 8 with graphs up to
    8), a mixed step, embedding, logits."""
    ms = P.MODELS[model]
    cells = []
    for op in ms.ops():
        if op.kind != "metadata":
            cells.append(P.Cell(model, op.name, op.kernels[0], "decode", 5, 2, 3, 8, graph_max))
    cells.append(P.Cell(model, "o_proj", "add_lora_linear", "mixed", 130, 2, 2, 16, graph_max))
    cells.append(P.Cell(model, "down_proj", "add_lora_linear", "decode", 130, 2, 2, 16,
                        graph_max))
    return cells


# ------------------------------------------------------------------------- timing
def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


_CAPTURE_STREAM: list[Any] = []


def time_graph(call: Call, n: int, warmup: int, repeats: int) -> tuple[list[float], None]:
    """Per-call µs from CUDA-event-timed replays of one graph holding ``n`` calls.

    Captured with ``capture_begin/end`` on a side stream rather than ``torch.cuda.graph``:
    that context manager runs ``gc.collect()`` and ``empty_cache()`` per capture in many torch
    versions (≈ 0.1-0.2 s here), which over thousands of cells would eat the device budget.
    """
    for c in range(n):  # compile (cold cache) + vLLM's pointer LUTs, outside the capture
        call(c)
    torch.cuda.synchronize()
    if not _CAPTURE_STREAM:
        _CAPTURE_STREAM.append(torch.cuda.Stream())
    stream = _CAPTURE_STREAM[0]
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            for c in range(n):
                call(c)
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(warmup):
        graph.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(repeats)]
    for start, end in ev:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    out = [s.elapsed_time(e) * 1e3 / n for s, e in ev]
    del graph
    return out, None


def time_eager(call: Call, n: int, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Per-call µs of ``n`` back-to-back eager calls (events), and the host's issue time."""
    for _ in range(max(warmup, 1)):
        for c in range(n):
            call(c)
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for c in range(n):
            call(c)
        t1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) * 1e3 / n)
        host.append((t1 - t0) * 1e6 / n)
    return gpu, host


def time_wall(call: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    """Wall-clock µs per call (host work, or anything on CPU)."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


# ------------------------------------------------------------------------- the sweep
class Stop(Exception):
    """SIGTERM/SIGINT: stop after writing what was measured."""


_SIGNALLED: list[int] = []  # set by the handler: a Stop re-wrapped by a library still stops


def gpu_facts(device: str) -> dict[str, Any]:
    """GPU, driver, CUDA, torch, Triton, Python: what the numbers were measured on."""
    import triton

    facts: dict[str, Any] = {
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cuda_runtime": torch.version.cuda, "device": device,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
            sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
            l2_cache_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        )
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            facts["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
            facts["driver"] = q.stdout.split(",")[1].strip() if q.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            facts["nvidia_smi"] = f"unavailable: {e}"
    else:
        facts["gpu"] = "none (CPU, Triton interpreter)"
    return facts


class Sweep:
    """Runs a plan, writing the CSV row by row, the log line by line and the provenance."""

    def __init__(self, k: Kernels, settings: Settings, log: Callable[[str], None]) -> None:
        self.k, self.s, self.log = k, settings, log
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.out = Path(settings.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out / "lora_kernel_times.csv"
        self.prov_path = self.out / "provenance.json"
        self.prov: dict[str, Any] = {}
        self.t_start = time.perf_counter()

    # -- provenance ------------------------------------------------------------------------
    def write_provenance(self, **update: Any) -> None:
        self.prov.update(update)
        self.prov["elapsed_s"] = round(time.perf_counter() - self.t_start, 1)
        tmp = self.prov_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.prov, indent=2, default=str) + "\n")
        tmp.replace(self.prov_path)

    def write_readme(self) -> None:
        p, src = self.prov, self.prov.get("vllm_kernels", {})
        lines = [
            "# vLLM 0.8.5 LoRA kernel times (lorafleet `benchmarks/gpu_lora_kernels.py`)",
            "",
            "Per-call times of vLLM's LoRA shrink/expand Triton kernels, launched as vLLM "
            "0.8.5's V1 engine launches them in a decode or mixed step, for the models' "
            "adapted layers. How it was produced and how it feeds the twin: "
            "`docs/gpu_kernel_sweep.md` in the lorafleet repository.",
            "",
            "## Provenance",
            "",
            "| | |", "|---|---|",
            f"| GPU | {p.get('gpu', '')} (capability {p.get('capability', '')}, "
            f"{p.get('sm_count', '')} SMs, {p.get('memory_gib', '')} GiB) |",
            f"| Driver / CUDA runtime | {p.get('driver', '')} / {p.get('cuda_runtime', '')} |",
            f"| torch / Triton / Python | {p.get('torch')} / {p.get('triton')} / "
            f"{p.get('python')} |",
            f"| Kernels | vLLM {src.get('vllm_version')} `{src.get('wheel')}` sha256 "
            f"`{src.get('wheel_sha256')}` (files unmodified, hashes in provenance.json) |",
            f"| Shims | {', '.join(sorted(self.prov.get('shims', {})))} |",
            f"| Date (UTC) | {p.get('started_utc')} |",
            f"| Status | {p.get('status')}: {p.get('rows_written')} rows of "
            f"{p.get('plan', {}).get('cells')} planned, {p.get('elapsed_s')} s |",
            "",
            "## `lora_kernel_times.csv`",
            "",
            "One row per (model, layer, kernel, mix, tokens, adapters, max_loras, "
            "max_lora_rank). Times are per call in microseconds; empty = not applicable.",
            "",
            columns_markdown(),
            "",
            "Other files: `provenance.json` (everything above, the plan and the settings), "
            "`sweep.log` (progress, the preflight check, timings vs the estimate).",
            "",
        ]
        (self.out / "README.md").write_text("\n".join(lines))

    # -- one row ---------------------------------------------------------------------------
    def row(self, cell: P.Cell, timing: str, calls: int, per_call: Sequence[float] | None,
            host: Sequence[float] | None, status: str = "ok") -> dict[str, Any]:
        launches = cell.launches()
        requests = len(P.request_slots(cell.tokens, cell.adapters, cell.max_loras, cell.mix))
        r: dict[str, Any] = {
            "model": cell.model, "layer": cell.op, "kernel": cell.kernel, "mix": cell.mix,
            "tokens": cell.tokens, "rows": cell.rows, "requests": requests,
            "adapters": cell.adapters, "max_loras": cell.max_loras,
            "max_lora_rank": cell.rank, "cuda_graph": int(cell.cuda_graph),
            "calls_per_step": cell.layer.calls_per_step, "timing": timing,
            "calls_per_repeat": calls, "repeats": len(per_call) if per_call else 0,
            "median_us": "", "p10_us": "", "p90_us": "", "min_us": "", "host_issue_us": "",
            "launches": len(launches), "grid_blocks": sum(la.blocks for la in launches),
            "active_blocks": sum(la.active_blocks for la in launches),
            "weight_mib": round(cell.weight_bytes() / 2**20, 3),
            "dtype": str(self.s.dtype).replace("torch.", ""), "status": status,
        }
        if per_call and status == "ok":
            r.update(median_us=round(statistics.median(per_call), 3),
                     p10_us=round(quantile(per_call, 0.1), 3),
                     p90_us=round(quantile(per_call, 0.9), 3), min_us=round(min(per_call), 3))
            if host:
                r["host_issue_us"] = round(statistics.median(host), 3)
        return r

    def measure(self, cell: P.Cell, bufs: OpBuffers | None) -> dict[str, Any]:
        s, cost, dev = self.s, self.s.cost, self.s.device
        if cell.kernel == "update_metadata":
            call0 = metadata_call(self.k, cell, dev)
            times = time_wall(call0, cost.warmup, cost.repeats)
            return self.row(cell, "host", 1, times, None)
        assert bufs is not None
        calls = min(cost.calls(cell), bufs.copies)
        metas = build_metas(self.k, cell, dev)
        call = make_call(self.k, cell, bufs, metas, dev, s.dtype)
        if dev == "cpu":
            def once() -> None:
                for c in range(calls):
                    call(c)
            times = [t / calls for t in time_wall(once, cost.warmup, cost.repeats)]
            return self.row(cell, "cpu_interpreter", calls, times, None)
        if cell.cuda_graph:
            times, _ = time_graph(call, calls, cost.warmup, cost.repeats)
            return self.row(cell, "graph_replay", calls, times, None)
        times, host = time_eager(call, calls, 1, cost.eager_repeats)
        return self.row(cell, "eager", calls, times, host)

    # -- the loop --------------------------------------------------------------------------
    def run(self, cells: Sequence[P.Cell], extra: dict[str, Any]) -> str:
        """Measure ``cells`` in order until done, out of budget, or stopped; return status."""
        s, cost = self.s, self.s.cost
        est = P.estimate_seconds(cells, cost)
        self.prov.update(gpu_facts(s.device))
        self.prov.update(
            started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            status="running", rows_written=0, vllm_kernels=self.k.source, shims=self.k.shims,
            vllm_imports=self.k.imports, settings={
                "device": s.device, "dtype": str(s.dtype), "budget_s": s.budget_s,
                "seed": s.seed, "cost_model": asdict(cost)},
            plan={**P.summarize(cells), "estimate_s": {k: round(v, 1) for k, v in est.items()}},
            **extra,
        )
        self.write_provenance()
        self.log(f"[plan] {len(cells)} cells, estimated {est['total_s']:.0f} s "
                 f"(measure {est['measure_s']:.0f} + compile {est['compile_s']:.0f} + start "
                 f"{est['startup_s']:.0f}); budget {s.budget_s:.0f} s")

        def on_signal(signum: int, _frame: Any) -> None:
            _SIGNALLED.append(signum)
            raise Stop(f"signal {signum}")

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        gc.collect()
        gc.freeze()  # imports' objects out of the collector's way: no 0.1 s pauses mid-timing
        self.status, self.written, self.errors, self.ratio = "complete", 0, 0, 1.0
        self._spent = self._spent_est = 0.0
        self._group: tuple[Any, ...] | None = None
        self._bufs: OpBuffers | None = None
        self._sizes: dict[tuple[Any, ...], tuple[int, int, int]] = {}
        for c in cells:  # what each group's buffers must hold: copies, rows, slots
            if c.kernel != "update_metadata":
                key = (c.tier, *c.group)
                old_sz = self._sizes.get(key, (0, 0, 0))
                self._sizes[key] = (max(old_sz[0], cost.calls(c)), max(old_sz[1], c.rows),
                                    max(old_sz[2], c.max_loras))
        last_prov = time.perf_counter()
        budget = P.Budget(s.budget_s, self.t_start)
        streak = 0
        try:
            with open(self.csv_path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(COLUMN_NAMES))
                writer.writeheader()
                fh.flush()
                for i, cell in enumerate(cells):
                    if _SIGNALLED:
                        raise Stop(f"signal {_SIGNALLED[0]}")
                    e = cost.seconds(cell) * self.ratio
                    if not budget.allows(time.perf_counter(), e):
                        self.status = "budget_reached"
                        self.log(f"[budget] stopping before cell {i + 1}/{len(cells)}: "
                                 f"{time.perf_counter() - self.t_start:.0f} s spent, next "
                                 f"≈ {e:.2f} s, budget {s.budget_s:.0f} s")
                        break
                    row = self._one(i, cells)
                    writer.writerow(row)
                    fh.flush()
                    self.written += 1
                    streak = 0 if row["status"] == "ok" else streak + 1
                    if streak >= MAX_ERROR_STREAK:
                        self.status = f"aborted ({streak} errors in a row)"
                        self.log(f"[abort] {streak} cells failed in a row: stopping to save "
                                 f"device time (see the errors above)")
                        break
                    if time.perf_counter() - last_prov > 15:
                        self.write_provenance(rows_written=self.written, errors=self.errors,
                                              actual_vs_estimate=round(self.ratio, 2))
                        last_prov = time.perf_counter()
        except Stop as st:
            self.status = f"stopped ({st})"
            self.log(f"[stop] {st}: {self.written} rows kept")
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        self.write_provenance(status=self.status, rows_written=self.written, errors=self.errors,
                              actual_vs_estimate=round(self.ratio, 2),
                              finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.write_readme()
        self.log(f"[done] {self.status}: {self.written}/{len(cells)} rows, {self.errors} errors, "
                 f"{time.perf_counter() - self.t_start:.0f} s -> {self.csv_path}")
        return self.status

    def _one(self, i: int, cells: Sequence[P.Cell]) -> dict[str, Any]:
        """Cell ``i``: (re)allocate its group's buffers if needed, measure, log, one row."""
        s, cost, cell = self.s, self.s.cost, cells[i]
        t0 = time.perf_counter()
        key = (cell.tier, *cell.group) if cell.kernel != "update_metadata" else None
        if key is not None and key != self._group:
            self._bufs = None
            self.k.clear_pointer_caches()
            if s.device == "cuda":
                torch.cuda.empty_cache()
            copies, rows, g_max = self._sizes[key]
            self._bufs = OpBuffers(cell, copies, rows, g_max, s.dtype, s.device, self.gen)
            self._group = key
        try:
            r = self.measure(cell, self._bufs)
        except Stop:
            raise
        except Exception as ex:  # noqa: BLE001 - recorded in the row, the sweep goes on
            if _SIGNALLED:  # the Stop came back wrapped (Triton's interpreter, torch ops)
                raise Stop(f"signal {_SIGNALLED[0]}") from ex
            self.errors += 1
            msg = f"error: {type(ex).__name__}: {ex}".replace("\n", " ")[:300]
            timing = "host" if cell.kernel == "update_metadata" else (
                s.timing_name or ("graph_replay" if cell.cuda_graph else "eager"))
            r = self.row(cell, timing, 1, None, None, msg)
            self.log(f"[error] {cell}: {msg}")
            if s.device == "cuda":
                torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self._spent += dt
        self._spent_est += cost.seconds(cell)
        self.ratio = max(0.25, self._spent / max(self._spent_est, 1e-9))
        self.log(
            f"[{i + 1}/{len(cells)}] {cell.model} {cell.op} {cell.kernel} {cell.mix} "
            f"t={cell.tokens} rows={r['rows']} a={cell.adapters} G={cell.max_loras} "
            f"r={cell.rank} graph={int(cell.cuda_graph)} median={r['median_us']} us ({dt:.2f} s)"
        )
        return r


def describe(res: CheckResult) -> str:
    """One log line per check: verdict, error vs tolerance vs the LoRA's own size, grids."""
    return (f"{'ok  ' if res.ok else 'FAIL'} {res.cell}: max|err| {res.max_abs_err:.2e} "
            f"(tol {res.tolerance:.2e}, LoRA adds up to {res.lora_delta:.2e}), padded rows "
            f"{'untouched' if res.padded_rows_untouched else 'CHANGED'}, grids {res.grids}"
            f"{'' if res.grids_ok else f' expected {res.expected_grids}'}")


def run_checks(k: Kernels, device: str, dtype: torch.dtype, model: str, graph_max: int,
               log: Callable[[str], None], seed: int = 0) -> list[CheckResult]:
    """The preflight: every code path once against the torch reference, grids included."""
    gen = torch.Generator().manual_seed(seed)
    results = []
    for cell in check_cells(model, graph_max):
        t0 = time.perf_counter()
        res = check_cell(k, cell, device, dtype, gen)
        results.append(res)
        log(f"[check] {describe(res)} ({time.perf_counter() - t0:.1f} s)")
    return results

