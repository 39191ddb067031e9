"""Placement suite: every registered policy on generated workloads, verified by the twin.

Workloads: 100, 500, 1,000 and 5,000 adapters with uniform, Zipf(1.0) and few-hot (4 adapters
take 60 %) rates, ranks 8/16/32/64 in proportion 4:3:2:1, 0.1 req/s per adapter on average
(ShareGPT-like lengths), plus examples/workload_azure.yaml's Azure trace sample mapped onto 400
adapters (Zipf) and compressed 50x in time, with its own lengths. Prints one JSON line per
workload: the `lorafleet plan --compare --json` object plus `workload`, `n_adapters`,
`predictor`, `lower_bound_busy_replicas` (the roofline before rounding), the capacity
estimate's fractional count, `lower_bound_wall_s` and, per policy, `replicas_over_bound` and
`replicas_over_estimate` (the planner's own estimate of what the mix needs).

    python benchmarks/placement_suite.py [--predictor surrogate|analytic|twin] [--no-verify]
        [--sizes 100,500,1000,5000] [--shapes uniform,zipf,few_hot,azure] [--profile NAME]
        [--verify-duration S] [--seed K]

Targets (issue #4): lorafleet uses the fewest replicas of all policies on every workload with
zero starved replicas; replicas <= 1.10 x the lower bound; plan time <= 2 s for 1,000 adapters
and <= 20 s for 10,000 (verification aside).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from placement.compare import compare  # noqa: E402
from placement.context import PlacementContext  # noqa: E402
from placement.errors import PlacementError  # noqa: E402
from placement.predictors import DEFAULT_PREDICTOR, PREDICTORS, make_predictor  # noqa: E402
from twin.azure_trace import read_azure_trace  # noqa: E402
from twin.profile import load_profile  # noqa: E402
from twin.workload import (  # noqa: E402
    Workload,
    few_hot_workload,
    uniform_workload,
    zipf_workload,
)

RANKS = {8: 0.4, 16: 0.3, 32: 0.2, 64: 0.1}
RATE_PER_ADAPTER = 0.1
AZURE_ADAPTERS = 400
AZURE_TIME_SCALE = 0.02  # the 200-request, 120 s sample replayed 50x faster: ~80 req/s


def workloads(sizes: list[int], shapes: list[str], seed: int) -> list[Workload]:
    out = []
    for n in sizes:
        total = RATE_PER_ADAPTER * n
        if "uniform" in shapes:
            out.append(uniform_workload(n, total, ranks=RANKS, seed=seed, name=f"uniform-{n}"))
        if "zipf" in shapes:
            out.append(zipf_workload(n, total, alpha=1.0, ranks=RANKS, seed=seed,
                                     name=f"zipf-{n}"))
        if "few_hot" in shapes:
            out.append(few_hot_workload(n, total, n_hot=4, hot_share=0.6, ranks=RANKS,
                                        seed=seed, name=f"few_hot-{n}"))
    if "azure" in shapes:
        # the window is the compressed trace's span, so the rates placement sees are the
        # trace's own (verification then runs them as Poisson arrivals for the full hour)
        trace = ROOT / "examples" / "azure_trace_sample.csv"
        span = float(read_azure_trace(str(trace))[0].max()) * AZURE_TIME_SCALE
        out.append(Workload.from_dict(
            {
                "name": f"azure-{AZURE_ADAPTERS}",
                "duration_s": span * 1.0001,
                "trace": {"path": "azure_trace_sample.csv", "format": "azure", "mapping": "zipf",
                          "alpha": 1.0, "time_scale": AZURE_TIME_SCALE,
                          "n_adapters": AZURE_ADAPTERS, "ranks": RANKS, "seed": seed},
            },
            base_dir=ROOT / "examples",
        ))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="llama-3.1-8b-instruct")
    ap.add_argument("--predictor", choices=PREDICTORS, default=DEFAULT_PREDICTOR,
                    help="the predictor plans are made with (default: `lorafleet plan`'s)")
    ap.add_argument("--no-verify", action="store_true", help="skip the twin verification runs")
    ap.add_argument("--sizes", default="100,500,1000,5000")
    ap.add_argument("--shapes", default="uniform,zipf,few_hot,azure")
    ap.add_argument("--verify-duration", type=float, default=3600.0)
    ap.add_argument("--target-utilisation", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    profile = load_profile(args.profile)
    predictor = make_predictor(args.predictor, profile, seed=args.seed)
    ctx = PlacementContext.for_profile(profile, predictor,
                                       target_utilisation=args.target_utilisation)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    shapes = [s for s in args.shapes.split(",") if s]
    for w in workloads(sizes, shapes, args.seed):
        t0 = time.perf_counter()
        try:
            result = compare(w, ctx, verify=not args.no_verify, duration_s=args.verify_duration,
                             seed=args.seed, workers=2)
        except PlacementError as exc:
            print(json.dumps({"workload": w.name, "error": str(exc)}), flush=True)
            continue
        obj = result.to_dict()
        for summary in obj["policies"].values():
            summary["replicas_over_bound"] = round(summary["replicas"] / obj[
                "lower_bound_replicas"], 3)
            summary["replicas_over_estimate"] = round(summary["replicas"] / obj[
                "capacity_estimate_replicas"], 3)
        line = {
            "workload": w.name, "n_adapters": len(w.adapters), "predictor": predictor.name,
            "offered_tps": round(w.offered_tokens_per_s(), 1), **obj,
            "lower_bound_busy_replicas": round(result.lower_bound.busy_ms_per_s / 1000, 3),
            "capacity_estimate_fractional": round(result.estimate.fractional, 3),
            "lower_bound_wall_s": result.lower_bound_wall_s,
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        print(json.dumps(_finite(line)), flush=True)


def _finite(obj):  # noqa: ANN001, ANN202 - JSON has no NaN
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    main()
