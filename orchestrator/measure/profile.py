"""`lorafleet profile`: measure a real vLLM engine and write calibration data for the twin.

Why: `twin.calibrate` fits a profile from per-step timings in the reference-data format
(data/reference/vllm-0.8.5-h100). Those come from one H100; this module produces the same four
tables (plus ``calibration.yaml`` and a README) for *this* machine by driving a live vLLM engine
through a designed sweep. Unlike the reference logs, every step row carries its exact batch
composition (prefill tokens, decode sequences, context tokens), so the calibrator does not have
to reconstruct it.

How: the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor),
so the EngineCore, its scheduler and the worker live in this Python process. We wrap, on the
instances, ``Scheduler.schedule`` (timestamp, scheduler time and batch composition of every
step), the worker's ``LRUCacheWorkerLoRAManager.add_adapter`` (disk -> CPU loads) and the model
manager's ``activate_adapter`` (CPU -> slot copies). vLLM must be created under
``if __name__ == "__main__":``, so the CLI (`cmd_profile`) runs ``python -m
orchestrator.measure.profile`` as a child process and only renders its progress lines.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PROGRESS_PREFIX = "LORAFLEET_PROGRESS "
DEFAULT_MODEL_NAME = "tiny-llama-cpu"
SOURCE = "lorafleet profile"
LOG_NAME = "profile.log"

# CPU-sized engine defaults. block_size: vLLM-CPU's attention kernels need a multiple of 32
# ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"), so 16 is not possible here.
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 32
MAX_NUM_BATCHED_TOKENS = 256
BLOCK_SIZE = 32
KV_CACHE_GIB = 1
PREFILL_PROMPTS = 256  # twin.step_features skips prefill runs with fewer prompts

# ----------------------------------------------------------------------------- table columns
# The reference columns (data/reference/vllm-0.8.5-h100/README.md) first, then what only a live
# profile knows. twin.step_features uses prefill_tokens/decode_seqs/ctx_tokens/load_ms if present.
STEP_COLUMNS = (
    "model", "sweep", "run", "step", "t_s", "step_ms", "scheduler_ms", "unique_adapters",
    "batched_tokens", "in_window",
    "prefill_tokens", "decode_seqs", "ctx_tokens", "load_ms",
    "exec_ms", "cpu_ms", "descheduled", "scheduled_reqs", "preempted_reqs",
)
RUN_COLUMNS = (
    "model", "sweep", "run", "engine", "enable_lora", "max_loras", "max_cpu_loras",
    "max_lora_rank", "adapter_ranks", "restrict_loras", "lora_pre_loading", "max_num_seqs",
    "max_num_seqs_effective", "max_num_batched_tokens", "max_model_len", "block_size",
    "kv_cache_tokens", "input_len", "output_len", "num_prompts", "request_rate", "status",
    "summary_source", "completed", "duration_s", "total_input_tokens", "total_output_tokens",
    "request_throughput_rps", "output_throughput_tps", "total_throughput_tps",
    "bench_start_perf_s", "bench_end_perf_s", "has_step_log", "server_log_missing",
    "server_log_nul_bytes", "log_has_batched_tokens", "n_steps", "n_steps_in_window",
    "non_monotonic_steps", "median_step_ms_in_window", "mean_unique_adapters_in_window",
    "mean_batched_tokens_in_window", "descheduled_steps", "disk_loads", "gpu_loads",
    "omp_threads",
)
KV_COLUMNS = (
    "model", "engine", "max_loras", "max_lora_rank", "max_cpu_loras", "enable_lora",
    "kv_cache_tokens", "num_blocks", "block_size", "kv_cache_gib", "max_model_len", "status",
)
LOAD_COLUMNS = (
    "model", "run", "engine", "max_loras", "max_cpu_loras", "max_lora_rank", "adapter",
    "adapter_rank", "kind", "load_ms", "loads_in_event", "cumulative_loads", "phase",
    "step_index",
)
OUTPUT_FILES = (
    "step_profiles.csv.gz", "profile_runs.csv", "kv_capacity.csv", "adapter_loads.csv",
    "calibration.yaml", "README.md",
)


class LiveProfileError(ValueError):
    """A bad model path, adapter registry or sweep request (the message says which)."""


# ----------------------------------------------------------------------------- model + adapters
@dataclass(frozen=True)
class Adapter:
    """One servable LoRA adapter; ``lora_int_id`` is what vLLM keys its caches by (>= 1)."""

    id: str
    rank: int
    path: Path
    lora_int_id: int


@dataclass(frozen=True)
class ModelSource:
    """What to serve: the base model folder, its vocabulary size and the adapters."""

    base_path: Path
    vocab_size: int
    adapters: tuple[Adapter, ...]


def resolve_model(path: str | Path, adapters_registry: str | Path | None = None) -> ModelSource:
    """A tiny-model root (``adapters.yaml`` inside) or a plain HF model dir (+ optional registry).

    A registry is YAML ``adapters: [{id, path, rank?}]`` with paths relative to the registry's
    folder; a missing rank is read from the adapter's ``adapter_config.json``.
    """
    import yaml

    root = Path(path).expanduser().resolve()
    if adapters_registry is None and (root / "adapters.yaml").is_file():
        from orchestrator.measure.tiny_model import load_tiny_model

        tiny = load_tiny_model(root)
        base = tiny.base_path
        entries = [(a.id, a.rank, a.path) for a in tiny.adapters]
    else:
        base = root
        entries = []
        if adapters_registry is not None:
            reg = Path(adapters_registry).expanduser().resolve()
            if not reg.is_file():
                raise LiveProfileError(f"--adapters-registry: {reg} not found")
            doc = yaml.safe_load(reg.read_text()) or {}
            items = doc.get("adapters") if isinstance(doc, dict) else None
            if not isinstance(items, list):
                raise LiveProfileError(f"{reg}: needs a list `adapters: [{{id, path}}]`")
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not {"id", "path"} <= set(item):
                    raise LiveProfileError(f"{reg}: adapters[{i}] needs id and path")
                apath = (reg.parent / str(item["path"])).resolve()
                cfg = apath / "adapter_config.json"
                if not cfg.is_file():
                    raise LiveProfileError(f"{reg}: adapters[{i}]: {cfg} not found")
                rank = item.get("rank") or json.loads(cfg.read_text()).get("r")
                if not isinstance(rank, int) or rank <= 0:
                    raise LiveProfileError(f"{reg}: adapters[{i}]: no positive integer rank")
                entries.append((str(item["id"]), rank, apath))
    config = base / "config.json"
    if not config.is_file():
        raise LiveProfileError(
            f"{root}: neither a tiny-model root (adapters.yaml) nor a model dir (config.json)"
        )
    cfg = json.loads(config.read_text())
    vocab = int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size") or 0)
    if vocab < 64:
        raise LiveProfileError(f"{config}: no usable vocab_size")
    adapters = tuple(
        Adapter(aid, int(rank), Path(p), i + 1) for i, (aid, rank, p) in enumerate(entries)
    )
    return ModelSource(base, vocab, adapters)


# ----------------------------------------------------------------------------- sweep design
@dataclass(frozen=True)
class EngineSpec:
    """One engine start: LoRA slots (max_loras), slot rank and CPU cache size, or no LoRA."""

    enable_lora: bool
    max_loras: int = 0
    max_lora_rank: int = 0
    max_cpu_loras: int = 0
    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_model_len: int = MAX_MODEL_LEN
    block_size: int = BLOCK_SIZE

    @property
    def tag(self) -> str:
        if not self.enable_lora:
            return "nolora"
        return f"G{self.max_loras}C{self.max_cpu_loras}R{self.max_lora_rank}"


@dataclass(frozen=True)
class RunSpec:
    """One profiling run: every request submitted at t=0 with exact prompt/output lengths.

    ``adapters`` holds one entry per request: an index into the engine's eligible adapters, or
    -1 for the base model. ``pre_load`` warms the run's adapters before timing starts (like the
    reference's --lora-pre-loading), so the run measures compute, not loads. ``reset_adapters``
    empties both adapter caches first (a fresh server); False keeps the previous run's.
    ``cache_order`` reorders the requests when the run starts, by the caches' state: adapters
    in the CPU cache but in no slot first (a CPU->slot copy, no disk read), then the slotted
    ones, then the rest.
    """

    sweep: str
    run: str
    input_len: int
    output_len: int
    adapters: tuple[int, ...]
    pre_load: bool = False
    reset_adapters: bool = True
    cache_order: bool = False

    @property
    def num_prompts(self) -> int:
        return len(self.adapters)

    @property
    def restrict_loras(self) -> int:
        return len({a for a in self.adapters if a >= 0})


@dataclass(frozen=True)
class EnginePlan:
    engine: EngineSpec
    runs: tuple[RunSpec, ...]
    eligible: tuple[int, ...]  # indices into ModelSource.adapters usable at this slot rank


QUICK_ENGINES = ((3, 16),)
FULL_ENGINES = (None, (2, 8), (4, 16))  # None: the same sweeps without LoRA (reference point)


def design_sweep(
    adapter_ranks: Sequence[int], quick: bool = False, seed: int | None = 0
) -> list[EnginePlan]:
    """The engines and runs to measure, given the ranks of the available adapters.

    decode: base requests, batch 1..max_num_seqs, short prompts (plus two context-heavy rows).
    prefill: PREFILL_PROMPTS prompts of one length, output 1: chunked prefill fills the budget.
    lora_overhead: a batch spread over A = 1..max_loras adapters (pre-loaded).
    adapter_loading: one request per adapter, more adapters than slots and than the CPU cache:
    a cold run (caches emptied: every adapter from disk) and a warm one right after it (the
    CPU-cached adapters only need a CPU->slot copy).

    Within an engine the decode/prefill/lora_overhead runs are shuffled (``seed``; None keeps
    the listed order): a shared machine's speed drifts over minutes, and a fixed order would
    confound that drift with batch size or adapter count. adapter_loading stays last, in order
    (warm must follow cold).
    """
    import random

    engines = QUICK_ENGINES if quick else FULL_ENGINES
    usable = [g for g in engines if g is None or any(r <= g[1] for r in adapter_ranks)]
    if not any(g is not None for g in usable):
        usable = [None]  # no adapters (or none fits): profile the base model only
    plans = []
    for g in usable:
        if g is None:
            engine = EngineSpec(enable_lora=False)
            eligible: tuple[int, ...] = ()
        else:
            max_loras, rank = g
            eligible = tuple(i for i, r in enumerate(adapter_ranks) if r <= rank)
            if len(eligible) < max_loras + 1:
                raise LiveProfileError(
                    f"engine max_loras={max_loras}, max_lora_rank={rank} needs at least "
                    f"{max_loras + 1} adapters of rank <= {rank}, found {len(eligible)}; "
                    "build more, e.g. `lorafleet tiny-model OUT --adapters 8 --ranks 8,16`"
                )
            # one CPU slot more than GPU slots (if adapters allow): the warm run gets CPU hits
            cpu = max_loras + 1 if len(eligible) >= max_loras + 2 else max_loras
            engine = EngineSpec(True, max_loras, rank, cpu)
        runs = list(_engine_runs(engine, len(eligible), quick))
        movable = [r for r in runs if r.sweep != "adapter_loading"]
        if seed is not None:
            random.Random(f"{seed}/{engine.tag}").shuffle(movable)
        fixed = [r for r in runs if r.sweep == "adapter_loading"]
        plans.append(EnginePlan(engine, (*movable, *fixed), eligible))
    return plans


def _engine_runs(e: EngineSpec, n_adapters: int, quick: bool) -> Iterator[RunSpec]:
    t = e.tag
    if quick:
        decode = [(b, 16, 48) for b in (1, 4, 8, 16, 32)] + [(8, 192, 32), (32, 192, 32)]
        prefill = (64, 160, 400)
    else:
        decode = [(b, 16, 64) for b in (1, 2, 4, 8, 12, 16, 24, 32)]
        decode += [(b, 224, 48) for b in (4, 16, 32)]
        prefill = (64, 128, 224, 320, 400)
    for b, i, o in decode:
        yield RunSpec("decode", f"{t}_B{b}_I{i}_O{o}", i, o, (-1,) * min(b, e.max_num_seqs))
    for i in prefill:
        yield RunSpec("prefill", f"{t}_B{PREFILL_PROMPTS}_I{i}_O1", i, 1, (-1,) * PREFILL_PROMPTS)
    if not e.enable_lora:
        return
    out = 32 if quick else 48
    for b in (8, 32) if quick else (4, 16, 32):
        for a in range(1, e.max_loras + 1):
            ids = tuple(k % a for k in range(b))  # round-robin over the first a adapters
            yield RunSpec("lora_overhead", f"{t}_B{b}_I32_O{out}_A{a}", 32, out, ids, True)
    # cold: empty caches, every adapter read from disk. warm: right after cold, caches kept,
    # CPU-cached adapters first: they need only a CPU->slot copy, the others hit disk again.
    cold = tuple(range(n_adapters))
    loading = [("cold", 16, True), ("warm", 16, False)]
    if not quick:
        loading.append(("cold", 48, True))
    for name, o, reset in loading:
        yield RunSpec("adapter_loading", f"{t}_{name}_N{n_adapters}_I64_O{o}", 64, o, cold,
                      reset_adapters=reset, cache_order=not reset)


def validate_plan(plans: Sequence[EnginePlan]) -> None:
    """Runs must fit the engine: prompt + output within max_model_len, batch within max_seqs."""
    keys: set[tuple[str, str]] = set()
    for p in plans:
        e = p.engine
        if e.max_num_batched_tokens < e.max_num_seqs:
            raise LiveProfileError(f"{e.tag}: max_num_batched_tokens < max_num_seqs")
        for r in p.runs:
            if (r.sweep, r.run) in keys:
                raise LiveProfileError(f"duplicate run {r.sweep}/{r.run}")
            keys.add((r.sweep, r.run))
            if r.input_len + r.output_len > e.max_model_len:
                raise LiveProfileError(f"{r.run}: prompt + output > max_model_len")
            if any(a >= len(p.eligible) for a in r.adapters):
                raise LiveProfileError(f"{r.run}: adapter index out of range")
            if not e.enable_lora and any(a >= 0 for a in r.adapters):
                raise LiveProfileError(f"{r.run}: LoRA request on an engine without LoRA")


def prompt_tokens(rng: Any, vocab_size: int, length: int, count: int) -> list[list[int]]:
    """Random token ids of exact length from the middle of the vocabulary (no special ids)."""
    low, high = max(8, vocab_size // 16), max(vocab_size // 2, 16)
    return rng.integers(low, high, size=(count, length)).tolist()


# ----------------------------------------------------------------------------- step recording
@dataclass
class StepComposition:
    """What one schedule() put in the batch (from SchedulerOutput + request objects)."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    ctx_tokens: int = 0
    batched_tokens: int = 0
    scheduled_reqs: int = 0
    adapters: frozenset[int] = frozenset()


def batch_composition(num_scheduled: dict[str, int], requests: dict[str, Any]) -> StepComposition:
    """Composition of a step, read *after* schedule() returned.

    By then the scheduler has advanced ``num_computed_tokens`` by the scheduled tokens
    (``_update_after_schedule``), so c_before = c - n. A request's tokens are prefill while
    c_before < max(prompt, num_tokens - 1), the boundary vLLM 0.32's KV manager uses too: it
    covers chunked prompts and recomputes after preemption (prompt + generated tokens).
    Context = sum of c_before + n, the tokens attention reads.
    """
    out = StepComposition()
    adapters: set[int] = set()
    for rid, n in num_scheduled.items():
        if n <= 0:
            continue
        r = requests[rid]
        c_after = int(r.num_computed_tokens)
        c_before = c_after - n
        if c_before < max(int(r.num_prompt_tokens), int(r.num_tokens) - 1):
            out.prefill_tokens += n
        else:
            out.decode_seqs += 1
        out.ctx_tokens += c_after
        out.batched_tokens += n
        out.scheduled_reqs += 1
        lora = getattr(r, "lora_request", None)
        if lora is not None and lora.lora_int_id > 0:
            adapters.add(int(lora.lora_int_id))
    out.adapters = frozenset(adapters)
    return out


@dataclass
class Recorder:
    """Collects steps and adapter loads of the run in progress (``begin``/``end``)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    loads: list[dict[str, Any]] = field(default_factory=list)
    run: str | None = None
    phase: str | None = None
    _run_steps: int = 0
    activation_ms: float = 0.0  # CPU->slot time inside the add_adapter call in progress
    _cumulative: dict[str, int] = field(default_factory=lambda: {"disk": 0, "gpu": 0})

    def begin(self, run: str | None, phase: str) -> None:
        self.run, self.phase, self._run_steps = run, phase, 0

    def end(self) -> None:
        self.run, self.phase = None, None

    @property
    def active(self) -> bool:
        return self.phase is not None

    def on_schedule(
        self, t_end: float, cpu_end: float, scheduler_ms: float, comp: StepComposition,
        preempted: int,
    ) -> None:
        if self.phase != "serving":
            return
        self.steps.append({
            "run": self.run, "step": self._run_steps, "t": t_end, "cpu": cpu_end,
            "scheduler_ms": scheduler_ms,
            "prefill_tokens": comp.prefill_tokens, "decode_seqs": comp.decode_seqs,
            "ctx_tokens": comp.ctx_tokens, "batched_tokens": comp.batched_tokens,
            "unique_adapters": len(comp.adapters), "scheduled_reqs": comp.scheduled_reqs,
            "preempted_reqs": preempted, "t_done": math.nan,
        })
        self._run_steps += 1

    def on_step_done(self, t_done: float) -> None:
        if self.phase == "serving" and self.steps and self.steps[-1]["run"] == self.run:
            self.steps[-1]["t_done"] = t_done

    def on_load(self, kind: str, lora_int_id: int, ms: float) -> None:
        if not self.active:
            return
        key = "disk" if kind == "disk_to_cpu" else "gpu"
        self._cumulative[key] += 1
        step = self._run_steps - 1 if self.phase == "serving" and self._run_steps else None
        self.loads.append({
            "run": self.run, "lora_int_id": lora_int_id, "kind": kind, "load_ms": ms,
            "loads_in_event": 1, "cumulative_loads": self._cumulative[key],
            "phase": self.phase, "step_index": step,
        })


def instrument(llm: Any, rec: Recorder) -> dict[str, Any]:
    """Wrap the in-process engine's scheduler, step and LoRA manager; returns the internals.

    Instance attributes shadow the class methods, so only this engine is affected. A step's
    timestamp is taken when schedule() returns, like the reference fork's log line, so the gap
    to the next one is forward + sampling + output processing + the next schedule().
    """
    core = llm.llm_engine.engine_core.engine_core  # InprocClient -> EngineCore
    scheduler = core.scheduler
    orig_schedule = scheduler.schedule

    def schedule(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = orig_schedule(*args, **kwargs)
        t1, c1 = time.perf_counter(), time.process_time()
        if rec.phase == "serving":
            comp = batch_composition(out.num_scheduled_tokens, scheduler.requests)
            preempted = len(getattr(out, "preempted_req_ids", None) or ())
            rec.on_schedule(t1, c1, (t1 - t0) * 1e3, comp, preempted)
        return out

    scheduler.schedule = schedule
    orig_step = core.step_fn

    def step_fn(*args: Any, **kwargs: Any) -> Any:
        out = orig_step(*args, **kwargs)
        rec.on_step_done(time.perf_counter())
        return out

    core.step_fn = step_fn
    internals: dict[str, Any] = {"core": core, "scheduler": scheduler, "lora_manager": None}
    runner = core.model_executor.driver_worker.worker.model_runner
    wm = getattr(runner, "lora_manager", None)
    if wm is not None:
        internals["lora_manager"] = wm
        am = wm._adapter_manager
        orig_activate, orig_add = am.activate_adapter, wm.add_adapter

        def activate_adapter(lora_id: int) -> bool:
            was_active = lora_id in am._active_adapters
            t0 = time.perf_counter()
            result = orig_activate(lora_id)
            ms = (time.perf_counter() - t0) * 1e3
            if not was_active:
                rec.activation_ms += ms
                rec.on_load("memory_to_gpu", int(lora_id), ms)
            return result

        def add_adapter(lora_request: Any) -> bool:
            cached = lora_request.lora_int_id in wm.list_adapters()
            rec.activation_ms = 0.0
            t0 = time.perf_counter()
            result = orig_add(lora_request)
            ms = (time.perf_counter() - t0) * 1e3
            if not cached:  # disk read + CPU registration (+ eviction), activation excluded
                rec.on_load("disk_to_cpu", int(lora_request.lora_int_id), ms - rec.activation_ms)
            return result

        am.activate_adapter = activate_adapter
        wm.add_adapter = add_adapter
    return internals


# ----------------------------------------------------------------------------- tables
def steps_frame(raw: Sequence[dict[str, Any]], model: str, sweep_of: dict[str, str]) -> Any:
    """Reference-format step table from recorded steps (one run after another).

    step_ms = gap to the next step's timestamp within the run (empty for a run's last step, as
    in the reference); t_s is relative to the run's first step; cpu_ms is the process CPU time
    over the same gap. in_window=0 marks steps that are not engine work: idle steps (no tokens
    scheduled) and *descheduled* steps, whose wall time exceeds the CPU time by more than
    DESCHEDULED_SLACK (the engine was runnable but another process had the core; with one
    OMP thread wall == CPU time otherwise). load_ms: the loads that ran inside the step.
    """
    import numpy as np
    import pandas as pd

    if not raw:
        return pd.DataFrame(columns=list(STEP_COLUMNS))
    df = pd.DataFrame(list(raw))
    df["model"] = model
    df["sweep"] = df["run"].map(sweep_of)
    parts = []
    for _, g in df.groupby("run", sort=False):
        g = g.sort_values("step").copy()
        t = g["t"].to_numpy(float)
        g["t_s"] = t - t[0]
        g["step_ms"] = np.append(np.diff(t) * 1e3, np.nan)
        g["exec_ms"] = (g["t_done"].to_numpy(float) - t) * 1e3
        g["cpu_ms"] = np.append(np.diff(g["cpu"].to_numpy(float)) * 1e3, np.nan)
        parts.append(g)
    df = pd.concat(parts, ignore_index=True)
    df["descheduled"] = descheduled(df["step_ms"], df["cpu_ms"]).astype(int)
    df["in_window"] = ((df["batched_tokens"] > 0) & (df["descheduled"] == 0)).astype(int)
    if "load_ms" not in df.columns:
        df["load_ms"] = 0.0
    return df[list(STEP_COLUMNS)]


DESCHEDULED_SLACK = (1.0, 0.2)  # ms, fraction of the CPU time


def descheduled(step_ms: Any, cpu_ms: Any) -> Any:
    """Steps whose wall time exceeds the process CPU time by > max(1 ms, 20 %)."""
    import numpy as np

    wall = np.asarray(step_ms, float)
    cpu = np.asarray(cpu_ms, float)
    slack = np.maximum(DESCHEDULED_SLACK[0], DESCHEDULED_SLACK[1] * cpu)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(wall - cpu, nan=0.0) > slack


def attach_load_ms(raw_steps: list[dict[str, Any]], loads: Sequence[dict[str, Any]]) -> None:
    """Add each step's total serving-load time (``load_ms``) to the recorded steps in place."""
    per: dict[tuple[str, int], float] = {}
    for ev in loads:
        if ev["phase"] == "serving" and ev["step_index"] is not None:
            key = (ev["run"], int(ev["step_index"]))
            per[key] = per.get(key, 0.0) + float(ev["load_ms"])
    for s in raw_steps:
        s["load_ms"] = round(per.get((s["run"], int(s["step"])), 0.0), 4)


def run_summary(steps: Any) -> dict[str, Any]:
    """Step-log bookkeeping columns of profile_runs.csv for one run's rows of steps_frame."""
    w = steps[steps["in_window"] == 1]
    return {
        "n_steps": int(len(steps)),
        "n_steps_in_window": int(len(w)),
        "descheduled_steps": int(steps["descheduled"].sum()),
        "non_monotonic_steps": int((steps["step_ms"].dropna() < 0).sum()),
        "median_step_ms_in_window": round(float(w["step_ms"].median()), 4) if len(w) else None,
        "mean_unique_adapters_in_window": round(float(w["unique_adapters"].mean()), 4)
        if len(w) else None,
        "mean_batched_tokens_in_window": round(float(w["batched_tokens"].mean()), 4)
        if len(w) else None,
    }


def cpu_label() -> str:
    """`cpu-<model name from /proc/cpuinfo>-<n>cores`, the profile's `gpu` field on CPU."""
    name = platform.processor() or platform.machine() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "unknown"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return f"cpu-{slug}-{cores}cores"


def calibration_meta(
    model: str, vllm_version: str, admit_only_if_prompt_fits: bool, engine: EngineSpec,
    gpu: str | None = None,
) -> dict[str, Any]:
    """``calibration.yaml``: the engine facts the tables cannot say (keys of twin META_KEYS)."""
    return {
        "gpu": gpu or cpu_label(),
        "model": model,
        "vllm_version": vllm_version,
        "cuda_graph_max_tokens": 0,  # CPU backend: no CUDA graphs, every step is "eager"
        "scheduler": {
            "kv_preallocate_blocks": 0,
            "admit_only_if_prompt_fits": bool(admit_only_if_prompt_fits),
        },
        "max_model_len": engine.max_model_len,
        "default_engine": {
            "max_num_seqs": engine.max_num_seqs,
            "max_num_batched_tokens": engine.max_num_batched_tokens,
            "block_size": engine.block_size,
        },
        "source": SOURCE,
    }


def write_tables(
    out: Path, steps: Any, runs: Any, kv: Any, loads: Any, meta: dict[str, Any], readme: str
) -> list[Path]:
    """Write the reference-format files (columns in the documented order)."""
    import pandas as pd
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    frames = {
        "step_profiles.csv.gz": (steps, STEP_COLUMNS),
        "profile_runs.csv": (runs, RUN_COLUMNS),
        "kv_capacity.csv": (kv, KV_COLUMNS),
        "adapter_loads.csv": (loads, LOAD_COLUMNS),
    }
    paths = []
    for name, (df, cols) in frames.items():
        df = pd.DataFrame(df).copy()
        for c in cols:
            if c not in df.columns:
                df[c] = pd.NA
        path = out / name
        df[list(cols)].to_csv(path, index=False, float_format="%.4f")
        paths.append(path)
    (out / "calibration.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    (out / "README.md").write_text(readme)
    return [*paths, out / "calibration.yaml", out / "README.md"]


# ----------------------------------------------------------------------------- the child process
def emit(event: str, **fields: Any) -> None:
    """One progress line for the parent CLI (everything else on stdout is vLLM's log)."""
    print(PROGRESS_PREFIX + json.dumps({"event": event, **fields}, default=str), flush=True)


@dataclass
class ProfileResult:
    out_dir: Path
    wall_s: float
    n_runs: int
    n_steps: int
    engines: list[dict[str, Any]]


def auto_omp_threads() -> int:
    """OMP threads `vllm serve` gives its CPU worker here: physical cores - 1.

    vLLM's auto binding (utils/ompmultiprocessing.py) takes one logical CPU per physical core
    of the first NUMA node and reserves one core for the EngineCore process. The in-process
    (uni) engine we profile skips that binding and would keep torch's default (all cores),
    which on a small box is both slower (OMP spin-waits around tiny kernels) and very
    sensitive to other processes, so we set what the server would use.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 1) - 1)
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo / "physical_package_id").read_text().strip()
                      + ":" + (topo / "core_id").read_text().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores) - 1)


def resolve_omp_threads(requested: int | None) -> int:
    """--omp-threads, else an OMP_NUM_THREADS already set, else `auto_omp_threads()`."""
    if requested is not None:
        if requested < 1:
            raise LiveProfileError(f"--omp-threads must be >= 1, got {requested}")
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else auto_omp_threads()


def _set_child_env(kv_cache_gib: int, omp_threads: int) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # EngineCore + worker in this process
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    os.environ["OMP_NUM_THREADS"] = str(omp_threads)  # read when torch is imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _make_engine(source: ModelSource, e: EngineSpec, seed: int) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if e.enable_lora:
        kwargs = {"enable_lora": True, "max_loras": e.max_loras, "max_lora_rank": e.max_lora_rank,
                  "max_cpu_loras": e.max_cpu_loras}
    return LLM(
        model=str(source.base_path), max_model_len=e.max_model_len, max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens, block_size=e.block_size,
        enable_prefix_caching=False, distributed_executor_backend="uni", seed=seed, **kwargs,
    )


def _generate(
    llm: Any, prompts: list[list[int]], output_len: int, loras: list[Any]
) -> list[Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        max_tokens=output_len, ignore_eos=True, temperature=0.0, detokenize=False
    )
    return llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
        lora_request=loras if any(x is not None for x in loras) else None,
    )


def run_profile(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    model_name: str = DEFAULT_MODEL_NAME,
    adapters_registry: str | Path | None = None,
    kv_cache_gib: int = KV_CACHE_GIB,
    omp_threads: int | None = None,
    progress: Callable[..., None] = emit,
) -> ProfileResult:
    """Run the whole sweep on live engines and write the tables (only in a `__main__` guard)."""
    threads = resolve_omp_threads(omp_threads)
    _set_child_env(kv_cache_gib, threads)
    t_start = time.perf_counter()
    source = resolve_model(model_path, adapters_registry)
    plans = design_sweep([a.rank for a in source.adapters], quick=quick, seed=seed)
    validate_plan(plans)
    out = Path(out_dir).expanduser().resolve()
    total = sum(len(p.runs) for p in plans)
    progress("start", total_runs=total, engines=[p.engine.tag for p in plans], out=str(out))

    import numpy as np
    import torch
    import vllm

    torch.set_num_threads(threads)  # in case torch was imported before OMP_NUM_THREADS was set
    session = _Session(source, np.random.default_rng(seed), seed, threads, total, progress)
    for plan in plans:
        session.profile_engine(plan, kv_cache_gib)
    tables = session.tables(model_name)
    # the block size the engine really used (vLLM may override the request)
    engine = replace(plans[-1].engine, block_size=session.engines[-1]["block_size"])
    meta = calibration_meta(model_name, vllm.__version__, session.admit_full_prompt, engine)
    wall = time.perf_counter() - t_start
    readme = render_readme(
        model_name=model_name, source=source, plans=plans, tables=tables, meta=meta,
        engines=session.engines, quick=quick, seed=seed, wall_s=wall, kv_cache_gib=kv_cache_gib,
        out_dir=out, omp_threads=threads,
    )
    write_tables(out, *tables, meta, readme)
    steps, runs, _, loads = tables
    progress("done", out=str(out), wall_s=round(wall, 1), runs=len(runs), steps=int(len(steps)),
             loads=int(len(loads)), engines=session.engines)
    return ProfileResult(out, wall, len(runs), int(len(steps)), session.engines)


def cache_rank(wm: Any, lora: Any) -> int:
    """0: in the CPU cache but in no slot, 1: in a slot, 2: not cached (base requests: 3)."""
    if lora is None:
        return 3
    if lora.lora_int_id in wm._adapter_manager._active_adapters:
        return 1
    return 0 if lora.lora_int_id in wm.list_adapters() else 2


class _Session:
    """State of one profiling process: the recorder and the rows collected so far."""

    def __init__(
        self, source: ModelSource, rng: Any, seed: int, threads: int, total: int,
        progress: Callable[..., None],
    ) -> None:
        self.source, self.rng, self.seed, self.threads = source, rng, seed, threads
        self.total, self.progress = total, progress
        self.rec = Recorder()
        self.run_rows: list[dict[str, Any]] = []
        self.kv_rows: list[dict[str, Any]] = []
        self.engines: list[dict[str, Any]] = []
        self.engine_of_run: dict[str, EngineSpec] = {}
        self.sweep_of: dict[str, str] = {}
        self.admit_full_prompt = False

    def prompts(self, length: int, count: int) -> list[list[int]]:
        return prompt_tokens(self.rng, self.source.vocab_size, length, count)

    def profile_engine(self, plan: EnginePlan, kv_cache_gib: int) -> None:
        """Start one engine, warm it up, run its sweeps, shut it down."""
        from vllm.lora.request import LoRARequest

        e = plan.engine
        t0 = time.perf_counter()
        self.progress("engine", engine=e.tag, config=asdict(e))
        llm = _make_engine(self.source, e, self.seed)
        start_s = time.perf_counter() - t0
        internals = instrument(llm, self.rec)
        wm = internals["lora_manager"]
        # 0.32 defaults scheduler_reserve_full_isl=True: admit only if the whole prompt fits
        self.admit_full_prompt = bool(
            getattr(internals["scheduler"], "scheduler_reserve_full_isl", False)
        )
        cache = internals["core"].vllm_config.cache_config
        num_blocks, block_size = int(cache.num_gpu_blocks), int(cache.block_size)
        kv_tokens = num_blocks * block_size  # usable blocks are one fewer (the null block)
        self.kv_rows.append({
            "engine": e.tag, "max_loras": e.max_loras, "max_lora_rank": e.max_lora_rank,
            "max_cpu_loras": e.max_cpu_loras, "enable_lora": int(e.enable_lora),
            "kv_cache_tokens": kv_tokens, "num_blocks": num_blocks, "block_size": block_size,
            "kv_cache_gib": kv_cache_gib, "max_model_len": e.max_model_len, "status": "ok",
        })
        adapters = [self.source.adapters[i] for i in plan.eligible]
        lora_requests = [LoRARequest(a.id, a.lora_int_id, str(a.path)) for a in adapters]

        def reset_adapters(wm: Any = wm) -> None:
            if wm is not None:
                wm.remove_all_adapters()  # both LRU caches empty, as in a fresh server

        # warm-up, not recorded: first-call costs, a full prefill budget, the LoRA kernels
        warm: list[Any] = [None, None, *lora_requests[: e.max_loras]]
        _generate(llm, self.prompts(64, len(warm)), 8, warm)
        _generate(llm, self.prompts(200, 4), 4, [None] * 4)
        reset_adapters()
        gc.collect()
        gc.freeze()  # the engine's objects leave the GC's view: shorter pauses while measuring
        steps_before = len(self.rec.steps)
        try:
            for spec in plan.runs:
                loras = [lora_requests[a] if a >= 0 else None for a in spec.adapters]
                if spec.reset_adapters:
                    reset_adapters()
                if spec.cache_order and wm is not None:
                    loras.sort(key=lambda x, wm=wm: cache_rank(wm, x))
                self.measure_run(llm, e, spec, loras, adapters, kv_tokens, block_size)
        finally:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm, internals
            gc.unfreeze()
            gc.collect()
        self.engines.append({
            "engine": e.tag, "start_s": round(start_s, 2),
            "steps": len(self.rec.steps) - steps_before,
            "wall_s": round(time.perf_counter() - t0, 2), "kv_cache_tokens": kv_tokens,
            "block_size": block_size,
        })

    def measure_run(
        self, llm: Any, e: EngineSpec, spec: RunSpec, loras: list[Any], adapters: list[Adapter],
        kv_tokens: int, block_size: int,
    ) -> None:
        """One run: pre-load if asked, submit everything at once, record, summarise."""
        rec = self.rec
        self.sweep_of[spec.run] = spec.sweep
        self.engine_of_run[spec.run] = e
        if spec.pre_load:
            uniq = list(dict.fromkeys(x for x in loras if x is not None))
            rec.begin(spec.run, "registration")
            _generate(llm, self.prompts(8, len(uniq)), 1, uniq)
            rec.end()
        prompts = self.prompts(spec.input_len, spec.num_prompts)
        first = len(rec.steps)
        rec.begin(spec.run, "serving")
        t_run = time.perf_counter()
        try:
            outputs = _generate(llm, prompts, spec.output_len, loras)
        finally:
            t_end = time.perf_counter()
            rec.end()
        gc.collect()
        n_steps = len(rec.steps) - first
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        complete = len(outputs) == spec.num_prompts and all(
            len(o.outputs[0].token_ids) == spec.output_len for o in outputs
        )
        duration = t_end - (rec.steps[first]["t"] if n_steps else t_run)
        in_tokens = spec.input_len * spec.num_prompts
        ranks = sorted({adapters[a].rank for a in spec.adapters if a >= 0})
        self.run_rows.append({
            "sweep": spec.sweep, "run": spec.run, "engine": e.tag,
            "enable_lora": int(e.enable_lora), "max_loras": e.max_loras,
            "max_cpu_loras": e.max_cpu_loras, "max_lora_rank": e.max_lora_rank,
            "adapter_ranks": ",".join(map(str, ranks)), "restrict_loras": spec.restrict_loras,
            "lora_pre_loading": int(spec.pre_load), "max_num_seqs": e.max_num_seqs,
            "max_num_seqs_effective": e.max_num_seqs,
            "max_num_batched_tokens": e.max_num_batched_tokens,
            "max_model_len": e.max_model_len, "block_size": block_size,
            "kv_cache_tokens": kv_tokens, "input_len": spec.input_len,
            "output_len": spec.output_len, "num_prompts": spec.num_prompts,
            "request_rate": "inf", "status": "ok" if complete else "incomplete",
            "summary_source": "live", "completed": len(outputs),
            "duration_s": round(duration, 6), "total_input_tokens": in_tokens,
            "total_output_tokens": out_tokens,
            "request_throughput_rps": round(len(outputs) / duration, 4),
            "output_throughput_tps": round(out_tokens / duration, 4),
            "total_throughput_tps": round((in_tokens + out_tokens) / duration, 4),
            "bench_start_perf_s": round(t_run, 6), "bench_end_perf_s": round(t_end, 6),
            "has_step_log": 1, "server_log_missing": 0, "server_log_nul_bytes": 0,
            "log_has_batched_tokens": 1, "omp_threads": self.threads,
        })
        self.progress(
            "run", done=len(self.run_rows), total=self.total, engine=e.tag, sweep=spec.sweep,
            run=spec.run, steps=n_steps, wall_s=round(t_end - t_run, 3),
            status=self.run_rows[-1]["status"],
        )

    def tables(self, model: str) -> tuple[Any, Any, Any, Any]:
        """(steps, runs, kv, loads) data frames in the reference formats."""
        import pandas as pd

        rec = self.rec
        attach_load_ms(rec.steps, rec.loads)
        steps = steps_frame(rec.steps, model, self.sweep_of)
        runs = pd.DataFrame(self.run_rows)
        runs.insert(0, "model", model)
        summaries = {r: run_summary(g) for r, g in steps.groupby("run")}
        for col in ("n_steps", "n_steps_in_window", "descheduled_steps", "non_monotonic_steps",
                    "median_step_ms_in_window", "mean_unique_adapters_in_window",
                    "mean_batched_tokens_in_window"):
            runs[col] = [summaries.get(r, {}).get(col) for r in runs["run"]]
        loads = loads_frame(rec.loads, model, self.source.adapters, self.engine_of_run)
        counts = loads.groupby(["run", "kind"]).size() if len(loads) else pd.Series(dtype=int)
        runs["disk_loads"] = [int(counts.get((r, "disk_to_cpu"), 0)) for r in runs["run"]]
        runs["gpu_loads"] = [int(counts.get((r, "memory_to_gpu"), 0)) for r in runs["run"]]
        kv = pd.DataFrame(self.kv_rows)
        kv.insert(0, "model", model)
        return steps, runs, kv, loads


def loads_frame(
    events: Sequence[dict[str, Any]], model: str, adapters: Sequence[Adapter],
    engine_of_run: dict[str, EngineSpec],
) -> Any:
    """adapter_loads.csv rows: one per disk->CPU load or CPU->slot activation."""
    import pandas as pd

    by_id = {a.lora_int_id: a for a in adapters}
    rows = []
    for ev in events:
        e = engine_of_run.get(ev["run"])
        a = by_id.get(ev["lora_int_id"])
        rows.append({
            **ev, "model": model, "engine": e.tag if e else None,
            "max_loras": e.max_loras if e else None,
            "max_cpu_loras": e.max_cpu_loras if e else None,
            "max_lora_rank": e.max_lora_rank if e else None,
            "adapter": a.id if a else None, "adapter_rank": a.rank if a else None,
            "load_ms": round(float(ev["load_ms"]), 4),
        })
    df = pd.DataFrame(rows, columns=[*LOAD_COLUMNS, "lora_int_id"])
    df["step_index"] = df["step_index"].astype("Int64")
    return df


def render_readme(
    *, model_name: str, source: ModelSource, plans: Sequence[EnginePlan],
    tables: tuple[Any, Any, Any, Any], meta: dict[str, Any], engines: list[dict[str, Any]],
    quick: bool, seed: int, wall_s: float, kv_cache_gib: int, out_dir: Path, omp_threads: int,
) -> str:
    """What was run, on what, and how to calibrate from it."""
    steps, runs, _, loads = tables
    e0 = plans[-1].engine
    lines = [
        f"# Live profile: `{model_name}` on {meta['gpu']}",
        "",
        f"Recorded by `lorafleet profile` ({'--quick' if quick else 'full sweep'}, seed {seed}) "
        f"on {time.strftime('%Y-%m-%d %H:%M:%S %Z')} in {wall_s:.0f} s wall. Format: the tables "
        "of data/reference/vllm-0.8.5-h100 (see its README) plus exact per-step batch "
        "columns; docs/live_profile.md explains the sweep.",
        "",
        "| | |",
        "|---|---|",
        f"| Engine | vLLM {meta['vllm_version']} (V1), CPU backend, in-process EngineCore "
        "(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, uni executor) |",
        f"| Machine | {meta['gpu']}, {omp_threads} OMP thread(s), "
        f"{platform.python_implementation()} {platform.python_version()} |",
        f"| Base model | `{source.base_path}` (vocab {source.vocab_size}) |",
        f"| Adapters | {len(source.adapters)} "
        f"(ranks {sorted({a.rank for a in source.adapters}) or '-'}) |",
        f"| Settings | max_model_len {e0.max_model_len}, max_num_seqs {e0.max_num_seqs}, "
        f"max_num_batched_tokens {e0.max_num_batched_tokens}, block_size "
        f"{engines[-1]['block_size'] if engines else e0.block_size}, chunked prefill on, prefix "
        f"caching off, KV cache {kv_cache_gib} GiB (`VLLM_CPU_KVCACHE_SPACE`), bf16 |",
        "| Requests | all of a run submitted at t=0 as token ids of exact length, "
        "`max_tokens`=output_len, `ignore_eos`, greedy, no detokenization |",
        "",
        "## Engines",
        "",
        "| engine | enable_lora | max_loras | max_cpu_loras | max_lora_rank | KV tokens | "
        "start (s) | steps | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p, info in zip(plans, engines, strict=False):
        e = p.engine
        lines.append(
            f"| {e.tag} | {int(e.enable_lora)} | {e.max_loras} | {e.max_cpu_loras} | "
            f"{e.max_lora_rank} | {info['kv_cache_tokens']:,} | {info['start_s']} | "
            f"{info['steps']:,} | {info['wall_s']} |"
        )
    lines += ["", "## Runs", "",
              "| sweep | runs | steps | in window | descheduled | median step (ms) |",
              "|---|---|---|---|---|---|"]
    for sweep, g in runs.groupby("sweep", sort=False):
        st = steps[steps["sweep"] == sweep]
        w = st[st["in_window"] == 1]
        lines.append(
            f"| {sweep} | {len(g)} | {len(st):,} | {len(w):,} | {int(st['descheduled'].sum())} "
            f"| {w['step_ms'].median():.2f} |"
        )
    if len(loads):
        lines += ["", "## Adapter loads", "", "| kind | phase | events | median ms |",
                  "|---|---|---|---|"]
        for (kind, phase), g in loads.groupby(["kind", "phase"]):
            lines.append(f"| {kind} | {phase} | {len(g)} | {g['load_ms'].median():.3f} |")
    bad = runs[runs["status"] != "ok"]
    if len(bad):
        lines += ["", f"**{len(bad)} run(s) did not complete:** {', '.join(bad['run'])}"]
    lines += [
        "", "## Calibrate", "", "```bash",
        f"lorafleet calibrate {out_dir} --model {model_name} -o profiles/{model_name}.yaml",
        "```", "",
        "`step_ms`: gap between consecutive schedule() returns within a run (forward, sampling, "
        "output processing and the next schedule); empty for a run's last step. `cpu_ms`: the "
        "process CPU time over the same gap. `in_window` = 0: idle (nothing scheduled) or "
        "descheduled (wall > CPU by more than max(1 ms, 20 %): another process had the core). "
        "`load_ms`: adapter loads inside the step (the calibrator subtracts it). `exec_ms`: "
        "schedule() return to EngineCore.step() return.", "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: ``python -m orchestrator.measure.profile --model PATH -o DIR ...``."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.measure.profile")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.output or default_output(args.model_name))
    try:
        check_output_dir(out, args.force)
        run_profile(
            args.model, out, quick=args.quick, seed=args.seed, model_name=args.model_name,
            adapters_registry=args.adapters_registry, kv_cache_gib=args.kv_cache_gib,
            omp_threads=args.omp_threads,
        )
    except (LiveProfileError, FileNotFoundError, FileExistsError) as exc:
        emit("error", message=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- the CLI (parent)
def default_output(model_name: str) -> str:
    return f"live-profile-{model_name}"


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to mix two profiles in one folder unless --force (which replaces our files)."""
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not force:
        raise FileExistsError(f"{out} already holds a profile ({existing[0]} ...); use --force")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["vllm"], default="vllm",
                   help="serving engine to profile (only vllm)")
    p.add_argument("--model", required=True,
                   help="tiny-model root (with adapters.yaml) or a HF model dir")
    p.add_argument("-o", "--output", default=None,
                   help="output folder (default: ./live-profile-<model-name>)")
    p.add_argument("--quick", action="store_true",
                   help="one engine (max_loras 3, rank 16), fewer runs: about 1-2 min")
    p.add_argument("--seed", type=int, default=0, help="prompt-token and engine seed")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                   help=f"`model` column of the tables (default {DEFAULT_MODEL_NAME})")
    p.add_argument("--adapters-registry", default=None,
                   help="with a plain HF model dir: YAML `adapters: [{id, path, rank?}]`")
    p.add_argument("--kv-cache-gib", type=int, default=KV_CACHE_GIB,
                   help=f"VLLM_CPU_KVCACHE_SPACE for the engines (default {KV_CACHE_GIB})")
    p.add_argument("--omp-threads", type=int, default=None,
                   help="torch/OMP threads of the engine (default: OMP_NUM_THREADS if set, else "
                   "what `vllm serve` binds: physical cores - 1, at least 1)")
    p.add_argument("--force", action="store_true", help="overwrite a previous profile in -o")


def add_parser(subparsers: Any) -> None:
    """Register `profile --engine vllm --model PATH [-o DIR] [--quick] [--seed K] ...`."""
    p = subparsers.add_parser(
        "profile",
        help="measure a live vLLM engine and write calibration tables for `lorafleet calibrate`",
        description="Drive a real in-process vLLM engine through decode / prefill / LoRA / "
        "adapter-loading sweeps and record per-step timings, KV capacity and adapter loads in "
        "the reference-data format (docs/live_profile.md).",
    )
    _add_arguments(p)
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="kill the profiling process after this many seconds (default 1800)")
    s = p.add_argument_group(
        "serving-path mode", "instead of the step sweeps: deploy listener -> ingress -> one "
        "replica of --model, drive a calibration workload with per-request stamps, fit what the "
        "serving path adds to a client's TTFT and gaps, and write it into PROFILE")
    s.add_argument("--serving-path", metavar="PROFILE", default=None,
                   help="profile name or YAML to fit and write the serving-path term into")
    s.add_argument("--serving-engine", choices=("vllm", "sim"), default="vllm",
                   help="the replica's engine (default vllm)")
    s.add_argument("--workload", default=str(REPO_ROOT / "examples" /
                                             "workload_cpu_calibrate.yaml"),
                   help="calibration workload (default examples/workload_cpu_calibrate.yaml)")
    s.add_argument("--duration", type=float, default=60.0, help="measured window (s)")
    s.add_argument("--refit", metavar="DIR", default=None,
                   help="fit the windows an earlier --serving-path run saved in DIR again "
                   "(no deployment)")
    p.set_defaults(func=cmd_profile)


def child_command(args: argparse.Namespace, out: Path) -> list[str]:
    """The `python -m orchestrator.measure.profile ...` line the CLI runs."""
    cmd = [sys.executable, "-m", "orchestrator.measure.profile", "--model", str(args.model),
           "-o", str(out), "--seed", str(args.seed), "--model-name", args.model_name,
           "--kv-cache-gib", str(args.kv_cache_gib)]
    if args.quick:
        cmd.append("--quick")
    if args.adapters_registry:
        cmd += ["--adapters-registry", str(args.adapters_registry)]
    if args.omp_threads is not None:
        cmd += ["--omp-threads", str(args.omp_threads)]
    if args.force:
        cmd.append("--force")
    return cmd


def parse_progress(line: str) -> dict[str, Any] | None:
    """The event of a child progress line, None for any other line (vLLM's log)."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        event = json.loads(line[len(PROGRESS_PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def child_python() -> str:
    """The venv's python: this one if it can import vLLM, else the repo's .venv, else this."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def cmd_profile(args: argparse.Namespace) -> int:
    """Run the sweep in a child process and show its progress; 0 ok, 2 user error, 1 failure."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    if getattr(args, "serving_path", None):
        from orchestrator.measure.serving_path import cmd_serving_path

        return cmd_serving_path(args)
    console, err = Console(), Console(stderr=True)
    out = Path(args.output or default_output(args.model_name)).expanduser().resolve()
    try:
        source = resolve_model(args.model, args.adapters_registry)  # fail fast, before vLLM
        validate_plan(design_sweep([a.rank for a in source.adapters], args.quick, args.seed))
        check_output_dir(out, args.force)
        if args.omp_threads is not None:
            resolve_omp_threads(args.omp_threads)
    except (LiveProfileError, FileNotFoundError, FileExistsError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    ), "PYTHONUNBUFFERED": "1"}
    cmd = child_command(args, out)
    cmd[0] = child_python()
    log_path = out / LOG_NAME
    final: dict[str, Any] = {}
    error = ""
    with log_path.open("w") as log, Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    ) as bar:
        task = bar.add_task("importing vLLM", total=None)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=str(REPO_ROOT), bufsize=1,
        )
        watchdog = threading.Timer(args.timeout, proc.kill)  # kills only the child we started
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # the child's log goes to OUT/profile.log
                log.write(line)
                ev = parse_progress(line)
                kind = ev.get("event") if ev else None
                if kind == "start":
                    bar.update(task, total=ev["total_runs"], completed=0,
                               description="importing vLLM")
                elif kind == "engine":
                    bar.update(task, description=f"starting engine {ev['engine']}")
                elif kind == "run":
                    bar.update(task, completed=ev["done"],
                               description=f"{ev['engine']} {ev['sweep']}")
                elif kind == "done":
                    final = ev
                elif kind == "error":
                    error = str(ev.get("message"))
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            err.print(f"[bold red]interrupted[/]; log: {log_path}")
            return 1
        finally:
            timed_out = not watchdog.is_alive() and proc.returncode not in (0, 2) and not final
            watchdog.cancel()
    if proc.returncode != 0 or not final:
        why = (f"killed after --timeout {args.timeout:.0f} s" if timed_out
               else f"exit {proc.returncode}")
        err.print(f"[bold red]error:[/] profiling failed ({why})"
                  f"{': ' + error if error else ''}; log: {log_path}")
        if not error:
            tail = log_path.read_text().splitlines()[-15:]
            err.print("\n".join(tail), highlight=False, markup=False)
        return 2 if proc.returncode == 2 else 1
    console.print(
        f"[bold]live profile[/] of {args.model_name}: {final['runs']} runs, "
        f"{final['steps']:,} steps, {final['loads']} adapter loads in {final['wall_s']:.0f} s "
        f"-> {out}\n  next: lorafleet calibrate {out} --model {args.model_name} "
        f"-o profiles/{args.model_name}.yaml",
        highlight=False, soft_wrap=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
