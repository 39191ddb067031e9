"""Re-plan latency with twin verification: Ray fan-out vs sequential, 100 to 5,000 adapters.

A re-plan is what the controller does when the workload drifts: plan the drifted workload with
the surrogate predictor (the lorafleet policy, target utilisation 1.0, plus a second candidate
at 0.85 for margin), then verify every candidate's replica groups with twin runs of
``--verify-window-s`` simulated seconds in ONE fan-out, and keep the candidate with the fewest
replicas that the twin finds unstarved. The drifted workload: placement_suite's workload of
that size and shape (0.1 req/s per adapter on average, ranks 8-64) with the popularity
reshuffled over the adapters (the hot set moved) and 20 % more traffic.

Each size is re-planned twice, the same work both times: verification fanned out as Ray tasks
(``orchestrator.control.fanout.ray_map`` on an in-process Ray with 2 CPUs) and sequentially in this
process (``twin.parallel.sequential_map``). Ray start-up (``ray_start_s``) and a warm-up (surrogate
JIT in this process, module imports in the Ray workers; ``warmup_s``) are timed once and left
out of the per-size figures; both are repeated on every line. Prints one JSON line per size:

    python benchmarks/replan.py [--sizes 100,1000,5000] [--verify-window-s 600] [--seed K]
        [--shape zipf|few_hot|uniform] [--profile NAME] [--batch-size B] [--num-cpus N]

The default window is 600 simulated seconds, not the hour ``lorafleet plan --verify`` uses: on
a 2-core machine one-hour runs make a 1,000-adapter re-plan take ~7 s (19 runs of ~0.55 s on
two cores), 600 s runs ~3 s. Short windows are conservative: the requests still in flight at
the window's end count as unserved, so a replica near the edge can be judged starved that a
one-hour run serves in full (see docs/placement.md, "Fanning out twin runs").

Fields: adapters, workload, predictor, verify_window_s, replicas (the chosen candidate's),
candidates [{target_utilisation, replicas, groups, starved_replicas}], groups (twin runs, all
candidates), plan_s, verify_s and replan_wall_s (fan-out), sequential_plan_s,
sequential_verify_s and sequential_wall_s, speedup (sequential_wall_s / replan_wall_s),
verify_speedup, identical (both ways verified the same figures), ray_start_s, warmup_s, and
load_1m (the machine's 1-minute load average before and after the size: other jobs on a shared
machine skew the timings). Progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.placement_suite import workloads  # noqa: E402
from orchestrator.control.cluster import NICENESS_ENV, ray_env  # noqa: E402
from placement.context import PlacementContext  # noqa: E402
from placement.planner import make_plan  # noqa: E402
from placement.predictors import make_predictor  # noqa: E402
from placement.verify import verify_plans  # noqa: E402
from twin.parallel import Mapper, Progress, sequential_map  # noqa: E402
from twin.profile import load_profile  # noqa: E402
from twin.workload import Workload  # noqa: E402

TARGETS = (1.0, 0.85)  # the candidates' target utilisation
DRIFT_GROWTH = 1.2
DEFAULT_WINDOW_S = 600.0


def drifted(base: Workload, seed: int) -> Workload:
    """``base`` with its rates reshuffled over the adapters and scaled by DRIFT_GROWTH."""
    rng = np.random.default_rng(seed + 1)
    rates = base.adapter_rates[rng.permutation(len(base.adapters))] * DRIFT_GROWTH
    adapters = tuple(
        replace(a, rate_rps=float(r)) for a, r in zip(base.adapters, rates, strict=True)
    )
    return replace(base, name=f"{base.name}-drifted", adapters=adapters)


def replan(
    workload: Workload, ctx: PlacementContext, window_s: float, seed: int, mapper: Mapper,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Plan every candidate, verify all of them in one fan-out, pick one; timed."""
    t0 = time.perf_counter()
    plans = [make_plan(workload, replace(ctx, target_utilisation=u)) for u in TARGETS]
    t1 = time.perf_counter()
    plans = verify_plans(plans, ctx.profile, duration_s=window_s, seed=seed, mapper=mapper,
                         progress=progress)
    t2 = time.perf_counter()
    ok = [p for p in plans if p.starved_replicas("verified") == 0]
    chosen = min(ok, key=lambda p: p.replicas) if ok else plans[-1]
    return {
        "plans": plans,
        "chosen": chosen,
        "plan_s": t1 - t0,
        "verify_s": t2 - t1,
        "wall_s": t2 - t0,
    }


def figures(plans: list[Any]) -> list[dict[str, dict[str, Any]]]:
    """The verified figures without the run's own wall time (which differs run to run)."""
    return [
        {g.name: {k: v for k, v in g.verified.items() if k != "wall_s"} for g in p.groups}
        for p in plans
    ]


class Bars:
    """rich progress bars on stderr (one task per fan-out), or nothing when rich is missing."""

    def __init__(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
        except ImportError:  # pragma: no cover - rich ships with lorafleet
            self._bars = None
            return
        self._bars = Progress(TextColumn("{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(),
                              console=Console(stderr=True), transient=True)

    def __enter__(self) -> Bars:
        if self._bars:
            self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars:
            self._bars.__exit__(*exc)

    def task(self, description: str) -> Callable[[int, int], None] | None:
        if not self._bars:
            return None
        bars, task = self._bars, self._bars.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bars.update(task, completed=done, total=total)

        return update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--shape", default="zipf", choices=("zipf", "few_hot", "uniform"))
    ap.add_argument("--profile", default="llama-3.1-8b-instruct")
    ap.add_argument("--verify-window-s", type=float, default=DEFAULT_WINDOW_S,
                    help=f"simulated seconds per twin run (default {DEFAULT_WINDOW_S:g}; "
                         "3600 = the full verification hour)")
    ap.add_argument("--batch-size", type=int, default=1, help="twin runs per Ray task")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the in-process Ray")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    profile = load_profile(args.profile)
    predictor = make_predictor("surrogate", profile, seed=args.seed)
    ctx = PlacementContext.for_profile(profile, predictor)

    # the settings of the head lorafleet starts (orchestrator.control.cluster.ray_env): among
    # them its workers at nice 0, not Ray's 15 - on a shared machine they would otherwise get
    # less CPU than the sequential run in this (nice 0) process. Same priority for both.
    os.environ.update(ray_env())
    import ray

    from orchestrator.control.fanout import ray_map

    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    ray_start_s = time.perf_counter() - t0
    try:
        fanout = ray_map(batch_size=args.batch_size)
        with Bars() as bars:
            # warm-up, untimed: the surrogate's JIT here, imports + a twin run in every worker
            t0 = time.perf_counter()
            small = drifted(workloads([60], [args.shape], args.seed)[0], args.seed)
            plan = replan(small, ctx, 60.0, args.seed, sequential_map)["plans"][0]
            verify_plans([plan] * (2 * args.num_cpus), profile, duration_s=60.0, mapper=fanout)
            warmup_s = time.perf_counter() - t0

            for n in sizes:
                load_before = os.getloadavg()[0]
                base = workloads([n], [args.shape], args.seed)[0]
                w = drifted(base, args.seed)
                fan = replan(w, ctx, args.verify_window_s, args.seed, fanout,
                             bars.task(f"{n} adapters: Ray fan-out"))
                seq = replan(w, ctx, args.verify_window_s, args.seed, sequential_map,
                             bars.task(f"{n} adapters: sequential"))
                chosen = fan["chosen"]
                line = {
                    "benchmark": "replan",
                    "adapters": n,
                    "workload": w.name,
                    "predictor": predictor.name,
                    "verify_window_s": args.verify_window_s,
                    "replicas": chosen.replicas,
                    "chosen_target_utilisation": TARGETS[fan["plans"].index(chosen)],
                    "candidates": [
                        {"target_utilisation": u, "replicas": p.replicas, "groups": len(p.groups),
                         "starved_replicas": p.starved_replicas("verified")}
                        for u, p in zip(TARGETS, fan["plans"], strict=True)
                    ],
                    "groups": sum(len(p.groups) for p in fan["plans"]),
                    "replan_wall_s": round(fan["wall_s"], 3),
                    "plan_s": round(fan["plan_s"], 3),
                    "verify_s": round(fan["verify_s"], 3),
                    "sequential_wall_s": round(seq["wall_s"], 3),
                    "sequential_plan_s": round(seq["plan_s"], 3),
                    "sequential_verify_s": round(seq["verify_s"], 3),
                    "speedup": round(seq["wall_s"] / fan["wall_s"], 2),
                    "verify_speedup": round(seq["verify_s"] / fan["verify_s"], 2),
                    "identical": figures(fan["plans"]) == figures(seq["plans"]),
                    "batch_size": args.batch_size,
                    "ray_cpus": args.num_cpus,
                    "ray_worker_niceness": int(os.environ[NICENESS_ENV]),
                    "ray_start_s": round(ray_start_s, 3),
                    "warmup_s": round(warmup_s, 3),
                    "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                }
                print(json.dumps(line), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
