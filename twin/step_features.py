"""Label every measured engine step of a profiling run with its batch composition.

A step log says how long each step took (and, in newer logs, how many tokens and adapters it
had), not which requests were in it. Profiling runs are deterministic, though: identical prompts,
fixed output lengths, every request sent at t=0. Two ways to recover prefill tokens P, decode
sequences D and context tokens K per step:

* **replay** — when ``batched_tokens`` is logged: running requests take their tokens first (V1
  order), what remains of the logged total are new prompts. Exact; the prompt length the server
  saw is chosen as the one that leaves no step inconsistent (tokenizers may add a token).
* **simulate** — otherwise: the twin's own engine runs the sweep (all prompts at t=0) and its
  trace supplies the features. Requests really trickle in over the first steps, so the simulated
  sequence is shifted by the surplus of logged steps and only steps far (±15) from any admission
  or finish are kept, where the batch is the same whichever way the trickle went.

A step that loaded an adapter is kept with the load's measured latency subtracted (loads are
modelled from their own table). Dropped: idle gaps and stalls (more than 2x or less than 0.5x the
rolling median of 31 steps), runs whose decode batch exceeds the KV cache (they preempt), and
logs flagged as partly overwritten.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.config import EngineConfig
from twin.engine import run_engine
from twin.latency import StepTimeModel
from twin.profile import AdapterLoadTable, KVCapacityModel, Profile


class CalibrationError(ValueError):
    """Calibration input that is missing or unusable (the message says which file/column).
    Defined here, below ``twin.calibrate`` (which re-exports it), as labelling steps is the
    first place it is raised."""


TRANSITION_STEPS = 15
ROLLING_STEPS = 31
COLUMNS = ["prefill_tokens", "decode_seqs", "ctx_tokens", "admitted", "finished", "scanned"]


def replay_logged_tokens(
    batched_tokens: np.ndarray, prompt_len: int, output_len: int, max_seqs: int
) -> tuple[np.ndarray, int]:
    """Rows of COLUMNS for a log with per-step token totals; returns (rows, inconsistent steps)."""
    computed: list[int] = []
    generated: list[int] = []
    running: list[int] = []
    rows = []
    bad = 0
    for total in batched_tokens.astype(int):
        left = int(total)
        sched: list[tuple[int, int]] = []
        for r in running:
            if left == 0:
                break
            n = min(prompt_len - computed[r] if computed[r] < prompt_len else 1, left)
            sched.append((r, n))
            left -= n
        if len(sched) < len(running):
            bad += 1
        admitted = 0
        while left > 0:
            if len(running) >= max_seqs:
                bad += 1
                break
            r = len(computed)
            computed.append(0)
            generated.append(0)
            n = min(prompt_len, left)
            running.append(r)
            sched.append((r, n))
            left -= n
            admitted += 1
        p = d = k = 0
        for r, n in sched:
            if computed[r] >= prompt_len:
                d += 1
            else:
                p += n
            k += computed[r] + n
        for r, n in sched:
            computed[r] += n
            if computed[r] >= prompt_len:
                generated[r] += 1
        before = len(running)
        running = [r for r in running if generated[r] < output_len]
        rows.append((p, d, k, admitted, before - len(running), np.nan))
    return np.asarray(rows, dtype=float).reshape(-1, len(COLUMNS)), bad


def _order_only_profile() -> Profile:
    """A profile whose timings do not matter: with every request at t=0 only the order counts."""
    return Profile(
        name="order-only",
        gpu="none",
        model="none",
        vllm_version="0.8.5",
        max_model_len=1 << 20,
        step_model=StepTimeModel(const=1.0),
        kv_capacity=KVCapacityModel(1 << 30, 0, 0, 1 << 30, ()),
        adapter_loads=AdapterLoadTable({}, {}, 0.0, 0.0),
    )


def simulated_steps(
    prompt_len: int, output_len: int, n_prompts: int, max_seqs: int, one_adapter_each: bool,
    budget: int = 2048,
) -> np.ndarray:
    """Rows of COLUMNS from the twin engine running the sweep with every request at t=0.

    ``one_adapter_each`` with max_loras=1 serialises the requests, like the adapter-loading runs.
    """
    n = n_prompts
    adapters = np.arange(n, dtype=np.int32) if one_adapter_each else np.full(n, -1, np.int32)
    config = EngineConfig(
        max_loras=1, max_cpu_loras=max(1, n), max_lora_rank=8, max_num_seqs=max_seqs,
        max_num_batched_tokens=max(budget, max_seqs), enable_lora=one_adapter_each,
    )
    res = run_engine(
        np.zeros(n), adapters, np.full(n, prompt_len, np.int32), np.full(n, output_len, np.int32),
        [8] * n, config, _order_only_profile(), duration_s=1e12, record_trace=True,
    )
    tr = res.trace
    assert tr is not None
    return np.column_stack(
        [tr.prefill_tokens, tr.decode_seqs, tr.ctx_tokens, tr.admitted, tr.finished, tr.scanned]
    ).astype(float)


def _near_events(events: np.ndarray, width: int) -> np.ndarray:
    hit = np.nan_to_num(events, nan=1.0) > 0
    return np.convolve(hit.astype(int), np.ones(2 * width + 1, int), "same") > 0


EXACT_COLUMNS = ("prefill_tokens", "decode_seqs", "ctx_tokens")


def has_exact_features(steps: pd.DataFrame) -> bool:
    """Logs written by `lorafleet profile` record each step's composition directly."""
    return all(c in steps.columns for c in EXACT_COLUMNS) and steps[
        list(EXACT_COLUMNS)
    ].notna().all().all()


def run_step_features(run: pd.Series, steps: pd.DataFrame, loads: pd.DataFrame) -> pd.DataFrame:
    """Features and a keep-mask for one profiling run's in-window steps."""
    w = steps.sort_values("step").reset_index(drop=True)
    lora = int(run["enable_lora"]) == 1
    if has_exact_features(w):
        rows = np.column_stack(
            [w[c].to_numpy(float) for c in EXACT_COLUMNS]
            + [np.zeros(len(w))] * 2
            + [w["scanned"].to_numpy(float) if "scanned" in w else np.full(len(w), np.nan)]
        )
        keep = np.ones(len(w), bool)
    else:
        rows, keep = _reconstructed(run, w)
    f = pd.DataFrame(rows, columns=COLUMNS)
    return _finish(f, run, w, loads, keep, lora)


def _reconstructed(run: pd.Series, w: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Features of a log that only has step times (and maybe token totals): replay/simulate."""
    out_len = int(run["output_len"])
    max_seqs = int(run["max_num_seqs_effective"])
    base_len = int(run["input_len"])
    if int(run.get("log_has_batched_tokens", 0) or 0) == 1 and w["batched_tokens"].notna().all():
        best = None
        for length in (base_len, base_len + 1):
            logged = w["batched_tokens"].to_numpy()
            rows, bad = replay_logged_tokens(logged, length, out_len, max_seqs)
            if best is None or bad < best[1]:
                best = (rows, bad)
        rows = best[0]
        keep = np.ones(len(w), bool)
    else:
        sequential = run["sweep"] == "adapter_loading"
        sim = simulated_steps(base_len, out_len, int(run["num_prompts"]), max_seqs, sequential)
        surplus = len(w) - len(sim)
        shift = 0
        if run["sweep"] == "decode":
            shift = surplus if surplus >= 6 else max(surplus, 0) // 2
        m = max(0, min(len(sim), len(w) - shift))
        rows = np.full((len(w), len(COLUMNS)), np.nan)
        rows[shift : shift + m] = sim[:m]
        if sequential:
            keep = np.zeros(len(w), bool)
            keep[:m] = True
        elif run["sweep"] == "prefill":
            keep = np.zeros(len(w), bool)
            keep[2 : max(2, m - 3)] = True
        else:
            keep = ~_near_events(rows[:, 3] + rows[:, 4], TRANSITION_STEPS)
            if surplus > 20:  # slow request ingestion: the wave phases are unknown
                keep[:] = False
    return rows, keep


def _finish(
    f: pd.DataFrame, run: pd.Series, w: pd.DataFrame, loads: pd.DataFrame, keep: np.ndarray,
    lora: bool,
) -> pd.DataFrame:
    """Common columns, measured load time removed, outlier and feasibility filters."""
    out_len = int(run.get("output_len", 0) or 0)
    max_seqs = int(run["max_num_seqs_effective"])
    base_len = int(run.get("input_len", 0) or 0)
    f["step_ms"] = w["step_ms"].to_numpy(float)
    f["scheduler_ms"] = (
        w["scheduler_ms"].to_numpy(float) if "scheduler_ms" in w else np.full(len(w), np.nan)
    )
    f["step"] = w["step"].to_numpy()
    f["lora_enabled"] = float(lora)
    f["lora_adapters"] = w["unique_adapters"].fillna(0).to_numpy(float) if lora else 0.0
    f["max_lora_rank"] = float(run["max_lora_rank"]) if lora else 0.0
    f["max_loras"] = float(run["max_loras"]) if lora else 0.0
    # a step that loaded an adapter took the load's measured time on top of its compute
    if "load_ms" in w.columns:  # recorded per step by the live profiler
        f["load_ms"] = w["load_ms"].fillna(0.0).to_numpy(float)
    else:
        serving = loads[(loads["run"] == run["run"]) & (loads["phase"] == "serving")]
        load_ms = serving.dropna(subset=["step_index"]).groupby("step_index")["load_ms"].sum()
        f["load_ms"] = f["step"].map(load_ms).fillna(0.0).to_numpy(float)
    f["step_ms"] = f["step_ms"] - f["load_ms"]
    # (the rolling median below sees compute only, so load steps are judged like the others)
    med = f["step_ms"].rolling(ROLLING_STEPS, center=True, min_periods=5).median()
    ratio = f["step_ms"] / med
    outlier = (ratio > 2.0) | (ratio < 0.5) | f["step_ms"].isna()
    kv = run.get("kv_cache_tokens")
    kv_ok = True
    if run["sweep"] == "decode" and kv == kv and kv is not None and out_len:
        kv_ok = max_seqs * int(np.ceil((base_len + out_len) / 16) * 16) <= float(kv)
    if float(run.get("server_log_nul_bytes", 0) or 0) > 0:
        kv_ok = False
    f["keep"] = keep & ~outlier.to_numpy() & kv_ok
    f["keep"] &= f["prefill_tokens"].notna().to_numpy()
    f["sweep"] = run["sweep"]
    f["run"] = run["run"]
    return f


def reference_step_features(ref) -> pd.DataFrame:  # ref: twin.calibrate.ReferenceData
    """Labelled, filtered steps of every profiling run with a step log, ready for the fit."""
    steps = ref.steps[ref.steps["in_window"] == 1]
    by_run = {k: g for k, g in steps.groupby(["sweep", "run"])}
    frames = []
    for _, run in ref.runs.iterrows():
        if int(run.get("has_step_log", 0) or 0) != 1:
            continue
        w = by_run.get((run["sweep"], run["run"]))
        if w is None or len(w) < 5 or run.get("status", "ok") != "ok":
            continue
        if run["sweep"] == "prefill" and int(run["num_prompts"]) < 256:
            continue  # a handful of steps with unknown arrival spacing: nothing to learn
        frames.append(run_step_features(run, w, ref.loads))
    if not frames:
        raise CalibrationError("no profiling run with a usable step log")
    out = pd.concat(frames, ignore_index=True)
    return out[out["keep"]].reset_index(drop=True)
