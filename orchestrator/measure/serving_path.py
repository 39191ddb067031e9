"""`lorafleet profile --serving-path PROFILE`: measure what the serving path adds to a client's
latency and write the term (``twin.serving_path``) into the profile.

It deploys the real path - listener, ingress, one engine replica (vLLM, or the sim) - on a
local Ray, drives a calibration workload open loop with every request asking for its stamps
(``x-lorafleet-timing``: the client's send, the ingress's arrival, the replica's arrival and
first output, the ingress's and the client's first chunk), shuts everything down, and fits the
term against the twin's replay of the very requests that were sent (``orchestrator.measure.
replay``): the engine's step scale from the TPOT ratio, then the TTFT line and the two noise
tables. The per-hop medians are kept in the term (``breakdown_ms``) to say where the time goes.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.openloop import OpenLoopResult, run_openloop
from orchestrator.measure.one_replica import one_replica, one_replica_plan
from orchestrator.measure.replay import replay_window
from twin.profile import Profile, profile_path
from twin.serving_path import MeasuredRequests, ServingPath, fit_term
from twin.workload import Workload

REPO_ROOT = Path(__file__).resolve().parents[2]
CALIBRATION_WORKLOAD = REPO_ROOT / "examples" / "workload_cpu_calibrate.yaml"
LOAD_SCALES = (1.0, 2.5, 6.0)  # the calibration workload's rate: light, busy, saturated
SETTLE_S = 5.0  # between windows
WINDOWS_FILE = "serving-path-windows.pkl"
MAX_FAILED = 0.02  # the share of a window's requests that may fail before the run is refused

# (label, later stamp, earlier stamp): the hops of ``breakdown_ms``
HOPS = (
    ("client -> ingress", "ingress_arrival", "client_send"),
    ("ingress -> replica", "engine_arrival", "ingress_arrival"),
    ("replica: engine's first output", "engine_first", "engine_arrival"),
    ("replica -> ingress (first chunk)", "ingress_first", "engine_first"),
    ("ingress -> client (first chunk)", "client_first", "ingress_first"),
)


@dataclass(frozen=True)
class ServingPathRun:
    term: ServingPath
    window: OpenLoopResult  # the first (light) window
    replayed: dict[str, Any]  # the twin with the term on its requests
    before: dict[str, Any]  # ... without the term (the engine alone)


def breakdown(stamps: dict[str, np.ndarray]) -> dict[str, float]:
    """Median milliseconds of each hop over the requests stamped at both of its ends."""
    out: dict[str, float] = {}
    for label, later, earlier in HOPS:
        d = (stamps[later] - stamps[earlier]) * 1e3
        d = d[np.isfinite(d)]
        if len(d):
            out[label] = float(np.median(d))
    return out


def measured_requests(res: OpenLoopResult) -> MeasuredRequests:
    """A window's requests as the fit reads them (failed ones without times)."""
    m = res.meas
    ok = ~m.failed
    return MeasuredRequests(
        prompt_len=res.batch.prompt_len, output_len=res.batch.output_len, send_s=m.send_s,
        first_token_s=np.where(ok, m.first_token_s, np.nan),
        finish_s=np.where(ok, m.finish_s, np.nan),
        gaps_ms=[list(g) if ok[i] else [] for i, g in enumerate(m.itl_gaps_ms)])


def fit_window(windows: Sequence[OpenLoopResult], plan: Any, profile: Profile, *,
               source: str) -> ServingPathRun:
    """The term of measured windows (``twin.serving_path.fit_term``; the first one light),
    each replayed on ``plan``'s replicas; ``profile``'s own term is ignored."""
    engine_only = profile.with_serving_path(None)

    def replay(term: ServingPath, k: int):
        r = replay_window(windows[k], plan, engine_only.with_serving_path(term), seed=k)
        return r.first_token_s, r.finish_s, r.metrics

    term = fit_term([measured_requests(w) for w in windows], [w.metrics for w in windows],
                    replay, source=source,
                    breakdown_ms=breakdown(windows[0].stamps) if windows[0].stamps else None)
    before = replay_window(windows[0], plan, engine_only)
    after = replay_window(windows[0], plan, engine_only.with_serving_path(term))
    return ServingPathRun(term, windows[0], after.metrics, before.metrics)


def measure_serving_path(model_dir: str | Path, profile: Profile, *, engine: str = "vllm",
                         workload_path: str | Path = CALIBRATION_WORKLOAD,
                         duration_s: float = 60.0, seed: int = 0,
                         scales: Sequence[float] = LOAD_SCALES,
                         state_dir: str | Path, progress: Callable[[str], None] = print
                         ) -> ServingPathRun:
    """Deploy one replica of ``model_dir`` serving the workload's adapters, measure a window
    at each of the workload's rate ``scales`` (light, busy, saturated: the step terms need
    the decode batch spread up to full), shut it all down, fit (module docstring)."""
    workload = Workload.from_yaml(workload_path)
    windows = []
    with one_replica("calibrate", [(a.id, a.rank) for a in workload.adapters], model_dir,
                     engine=engine, profile=profile.name, state_dir=state_dir,
                     progress=progress) as (plan, state):
        for k, scale in enumerate(scales):
            progress(f"window {k + 1}/{len(scales)}: {duration_s:g} s of {workload.name} "
                     f"x{scale:g}, stamped")
            res = asyncio.run(run_openloop(workload.scaled(scale), state.url, duration_s,
                                           seed=seed + k, timing=True, progress=progress))
            if len(res.errors) > MAX_FAILED * len(res.batch):
                raise RuntimeError(f"{len(res.errors)} of {len(res.batch)} calibration "
                                   f"requests failed; first: {res.errors[0]}")
            if res.errors:  # a few: the fit leaves them out
                progress(f"{len(res.errors)} request(s) failed (left out); first: "
                         f"{res.errors[0]}")
            windows.append(res)
            time.sleep(SETTLE_S)
    source = (f"lorafleet profile --serving-path ({engine}, {workload.name} x"
              f"{'/'.join(f'{s:g}' for s in scales)}, {duration_s:g} s each, seed {seed}, "
              f"{datetime.now(UTC):%Y-%m-%d})")
    save_windows(Path(state_dir) / WINDOWS_FILE, windows, source)
    return fit_window(windows, plan, profile, source=source)


def save_windows(path: Path, windows: Sequence[OpenLoopResult], source: str) -> None:
    """The measured windows as they were (``--refit`` fits them again without a deployment)."""
    with open(path, "wb") as f:
        pickle.dump({"source": source, "windows": list(windows)}, f)


def load_windows(path: Path) -> tuple[list[OpenLoopResult], str]:
    with open(path, "rb") as f:
        d = pickle.load(f)  # noqa: S301 - our own file, written by save_windows
    return d["windows"], d["source"]


def write_term(profile_path: str | Path, term: ServingPath, out: str | Path | None = None
               ) -> Path:
    """The profile at ``profile_path`` with ``term`` as its serving path, written to ``out``
    (default: in place)."""
    target = Path(out or profile_path)
    Profile.from_yaml(profile_path).with_serving_path(term).to_yaml(target)
    return target


def cmd_serving_path(args: Any) -> int:
    """`lorafleet profile --serving-path PROFILE --model DIR [...]`."""
    from rich.console import Console
    from rich.table import Table

    console, err = Console(), Console(stderr=True)
    try:
        path = profile_path(args.serving_path)
        profile = Profile.from_yaml(path)
        if not args.refit and not Path(args.model).is_dir():
            raise FileNotFoundError(f"--model: {args.model} is not a folder (lorafleet "
                                    "tiny-model builds one)")
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return 2
    state_dir = Path(args.output or "serving-path-run").resolve()
    if args.refit:  # the windows of an earlier measurement, fitted again
        windows, source = load_windows(Path(args.refit) / WINDOWS_FILE)
        ranks = {a.id: a.rank for w in windows for a in w.workload.adapters}
        plan = one_replica_plan("calibrate", list(ranks.items()), profile.name)
        run = fit_window(windows, plan, profile, source=source + " (refitted)")
    else:
        with err.status("measuring the serving path...") as status:
            run = measure_serving_path(args.model, profile, engine=args.serving_engine,
                                       workload_path=args.workload, duration_s=args.duration,
                                       seed=args.seed, state_dir=state_dir,
                                       progress=lambda m: status.update(m))
    target = write_term(path, run.term)
    tab = Table(title="where a first token's time goes (medians over the window)",
                header_style="bold")
    tab.add_column("hop")
    tab.add_column("ms", justify="right")
    for label, ms in run.term.breakdown_ms.items():
        tab.add_row(label, f"{ms:.2f}")
    console.print(tab)
    m = run.window.metrics
    console.print(
        f"{run.term.describe()}\nTTFT p50 measured {m['ttft_median_ms']:.1f} ms; the twin on "
        f"the same requests: {run.before['ttft_median_ms']:.1f} ms engine alone, "
        f"{run.replayed['ttft_median_ms']:.1f} ms with the term\nwritten to {target}",
        highlight=False)
    return 0 if all(math.isfinite(v) for v in run.term.ttft_noise_ms) else 1
