"""Live fidelity: the twin's replay against what a client of the deployed serving path measured.

One deployment (listener -> ingress -> one engine replica serving the workloads' adapters) is
driven open loop by each workload twice (seeds 0 and 1: two draws of the same workload), and
each window is replayed in the twin with the very requests that were sent
(``orchestrator.measure.replay``). Per workload: the two runs' figures, the relative error of
the replay on the runs' means, and the run-to-run spread of the measurement, which bounds how
close any model can be (``TARGETS``).
"""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.openloop import OpenLoopResult, run_openloop
from orchestrator.measure.one_replica import one_replica
from orchestrator.measure.replay import replay_window
from twin.profile import Profile
from twin.workload import Workload

METRICS = ("total_throughput_tps", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
_KEYS = {"total_throughput_tps": "total_throughput_tps", "ttft_p50_ms": "ttft_median_ms",
         "ttft_p99_ms": "ttft_p99_ms", "itl_p50_ms": "itl_median_ms", "itl_p99_ms": "itl_p99_ms"}
# metric -> (floor, x spread): |error| <= max(floor, x * run-to-run spread)
TARGETS = {"total_throughput_tps": (0.15, 1.5), "ttft_p50_ms": (0.15, 1.5),
           "itl_p50_ms": (0.15, 1.5), "ttft_p99_ms": (0.30, 1.5), "itl_p99_ms": (0.30, 1.5)}
SETTLE_S = 5.0  # between windows: the aborted requests of an overloaded window leave the engine
WINDOWS_FILE = "fidelity-windows.pkl"


def score(measured: Sequence[dict[str, Any]], replayed: Sequence[dict[str, Any]]
          ) -> dict[str, Any]:
    """errors (replayed / measured - 1 on the runs' means), spread (|run 1 - run 2| / their
    mean) and whether each error is within its target."""
    errors, spread, ok = {}, {}, {}
    for name in METRICS:
        k = _KEYS[name]
        m = np.array([float(r[k]) for r in measured])
        r = np.array([float(x[k]) for x in replayed])
        mean_m = float(np.mean(m))
        errors[name] = float(np.mean(r) / mean_m - 1) if mean_m else float("nan")
        spread[name] = float(np.ptp(m) / mean_m) if mean_m and len(m) > 1 else 0.0
        floor, times = TARGETS[name]
        ok[name] = bool(abs(errors[name]) <= max(floor, times * spread[name]))
    return {"errors": errors, "spread": spread, "within_target": ok}


def run_fidelity(model_dir: str | Path, profile: Profile, workloads: Sequence[str | Path], *,
                 engine: str = "vllm", window_s: float = 60.0, runs: int = 2,
                 state_dir: str | Path, progress: Callable[[str], None] = print
                 ) -> list[dict[str, Any]]:
    """One result dict per workload (module docstring)."""
    loaded = [Workload.from_yaml(w) for w in workloads]
    adapters = {a.id: a.rank for w in loaded for a in w.adapters}
    windows: dict[str, list[OpenLoopResult]] = {}
    with one_replica("fidelity", list(adapters.items()), model_dir, engine=engine,
                     profile=profile.name, state_dir=state_dir,
                     progress=progress) as (plan, state):
        for w in loaded:
            for seed in range(runs):
                progress(f"{w.name} run {seed + 1}/{runs}: {window_s:g} s at {state.url}")
                windows.setdefault(w.name, []).append(asyncio.run(run_openloop(
                    w, state.url, window_s, seed=seed, progress=progress)))
                time.sleep(SETTLE_S)
    with open(Path(state_dir) / WINDOWS_FILE, "wb") as f:  # rescore_windows reads them again
        pickle.dump({"engine": engine, "plan": plan, "windows": windows}, f)
    return score_windows(windows, plan, profile, engine)


def rescore_windows(path: str | Path, profile: Profile) -> list[dict[str, Any]]:
    """The windows a ``run_fidelity`` saved, scored again with ``profile`` (no deployment)."""
    with open(path, "rb") as f:
        d = pickle.load(f)  # noqa: S301 - our own file, written by run_fidelity
    return score_windows(d["windows"], d["plan"], profile, d["engine"])


def score_windows(windows: dict[str, list[OpenLoopResult]], plan: Any, profile: Profile,
                  engine: str) -> list[dict[str, Any]]:
    """One result dict per workload: each window replayed (seeded by its run), scored."""
    out = []
    for name, runs in windows.items():
        measured = [r.metrics for r in runs]
        replayed = [replay_window(r, plan, profile, seed=k).metrics for k, r in enumerate(runs)]
        out.append({
            "workload": name, "window_s": runs[0].meas.window_s, "engine": engine,
            "profile": profile.name,
            "serving_path": profile.serving_path.describe() if profile.serving_path else None,
            "measured": [{k: m[_KEYS[k]] for k in METRICS} for m in measured],
            "replayed": [{k: r[_KEYS[k]] for k in METRICS} for r in replayed],
            **score(measured, replayed),
        })
    return out
