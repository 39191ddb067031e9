"""The live-engine calibration loop, end to end, on whatever engine this machine has.

tiny model -> `lorafleet profile` on a real vLLM -> `lorafleet calibrate` -> `lorafleet bench` of
each workload (twice, same requests, to measure the engine's own run-to-run noise) ->
`lorafleet validate` of those rows with the fitted profile. Used by benchmarks/live_loop.py (the
figures in docs/twin.md) and by the marked integration test.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twin.calibrate import calibrate_reference, smape
from twin.validate import load_runs, validate

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_NAME = "tiny-llama-cpu"


@dataclass(frozen=True)
class LoopWorkload:
    """A workload file and the engine it is served on (small engines saturate on CPU)."""

    path: Path
    max_loras: int = 4
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256


DEFAULT_WORKLOADS: tuple[LoopWorkload, ...] = (
    LoopWorkload(REPO_ROOT / "examples" / "workload_cpu_light.yaml"),
    LoopWorkload(REPO_ROOT / "examples" / "workload_cpu_saturated.yaml", max_num_seqs=4,
                 max_num_batched_tokens=64),
)


def _lorafleet(*args: str, timeout: int = 1800) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
        timeout=timeout, cwd=REPO_ROOT,
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"lorafleet {args[0]} failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
            f"{res.stderr[-3000:]}"
        )
    return res.stdout


def run_live_loop(
    out_dir: Path,
    workloads: Sequence[LoopWorkload] = DEFAULT_WORKLOADS,
    *,
    quick: bool = True,
    window_s: float = 30.0,
    repeats: int = 2,
    seed: int = 1,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Run the loop into ``out_dir``; returns the fit report and per-workload figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny = out_dir / "tiny"
    log("building the tiny model")
    _lorafleet("tiny-model", str(tiny), "--adapters", "6", "--ranks", "8,16", "--force")
    prof_dir = out_dir / "profile"
    log("profiling the live engine")
    _lorafleet("profile", "--engine", "vllm", "--model", str(tiny), "-o", str(prof_dir),
               "--force", *(["--quick"] if quick else []))
    profile, report = calibrate_reference(prof_dir, PROFILE_NAME)
    profile_path = out_dir / f"{PROFILE_NAME}.yaml"
    profile.to_yaml(profile_path)
    runs_csv = out_dir / "runs.csv"
    runs_csv.unlink(missing_ok=True)
    for w in workloads:
        for rep in range(repeats):
            log(f"bench {w.path.name} ({rep + 1}/{repeats})")
            _lorafleet(
                "bench", str(w.path), "--engine", "vllm", "--model", str(tiny),
                "--max-loras", str(w.max_loras), "--max-num-seqs", str(w.max_num_seqs),
                "--max-num-batched-tokens", str(w.max_num_batched_tokens),
                "--duration", str(window_s), "--seed", str(seed), "--out", str(runs_csv),
                "--json",
            )
    runs = load_runs(runs_csv)
    result = validate(runs, str(profile_path), workers=1, client_max_inflight=None)
    table = result.predictions
    table.to_csv(out_dir / "predictions.csv", index=False)
    figures = {}
    for name, grp in table.groupby("workload", sort=False):
        row: dict[str, Any] = {"runs": int(len(grp))}
        for metric in ("total_throughput_tps", "ttft_mean_ms", "itl_mean_ms"):
            measured = grp[metric].to_numpy(float)
            predicted = grp[f"twin_{metric}"].to_numpy(float)
            row[f"measured_{metric}"] = [round(float(x), 2) for x in measured]
            row[f"twin_{metric}"] = round(float(predicted[0]), 2)
            row[f"smape_{metric}"] = round(smape(np.array([measured.mean()]), predicted[:1]), 2)
            row[f"run_to_run_smape_{metric}"] = (
                round(smape(measured[:1], measured[1:2]), 2) if len(measured) > 1 else None
            )
        row["measured_starved"] = bool(grp["measured_starved"].iloc[0])
        row["twin_starved"] = bool(grp["twin_starved"].iloc[0])
        figures[str(name)] = row
    return {
        "profile": str(profile_path),
        "step_fit_held_out": report["held_out"],
        "workloads": figures,
        "predictions": table,
    }
