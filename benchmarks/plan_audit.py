"""Plans audited on workloads nobody tuned to (issue #17): seeded, diverse, checked by the twin.

``placement.audit`` draws ``--n`` workloads from ``--seed`` (lengths from a few tokens to
thousands, 1-2,000 adapters, uniform / Zipf / few-hot rates, rank mixes of 8-64, from a sliver of
one replica's load to tens of replicas' worth), plans each as ``lorafleet plan`` does with the
default predictor (the predictor's plan, verified with full twin runs, tightened while the twin
starves a replica, relaxed while it accepts fewer), notes the predictor's plan alone
(``--no-verify``) beside it, and searches the fewest replicas the twin accepts apart from that
rule (two packings per count, each verified). Prints one JSON line per workload (the plan's
replicas, the predictor's alone, starved replicas, the twin's minimum, the printed lower bound,
the predictor's plan time and ``lorafleet plan``'s, ratios) and a summary line:

    {"summary": true, "n", "worst_ratio", "mean_ratio", "worst_predicted_ratio",
     "mean_predicted_ratio", "starved_plans", "bound_violations", "plans_over_twin_min",
     "outside_domain_plans", "max_plan_s_1000_adapters", "max_total_s_1000_adapters", "worst",
     "unplanned" (workloads without any plan the twin accepts, even at a tight margin), ...}

Targets: worst_ratio <= 1.15, 0 starved plans, 0 bound violations, plan time <= 2 s at 1,000
adapters.

    python benchmarks/plan_audit.py [--n 64] [--seed 0] [--profile llama-3.1-8b-instruct]
        [--predictor surrogate] [--verify-duration 3600] [--workers 2] [--limit K] [--start S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from placement.audit import audit_plan, audit_workloads, summary  # noqa: E402
from placement.context import PlacementContext  # noqa: E402
from placement.errors import PlacementError  # noqa: E402
from placement.predictors import DEFAULT_PREDICTOR, PREDICTORS, make_predictor  # noqa: E402
from placement.verify import verify_plans  # noqa: E402
from twin.profile import load_profile  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="llama-3.1-8b-instruct")
    ap.add_argument("--predictor", default=DEFAULT_PREDICTOR, choices=PREDICTORS)
    ap.add_argument("--verify-duration", type=float, default=3600.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="audit only the first K workloads")
    ap.add_argument("--start", type=int, default=0,
                    help="skip the first S workloads (resume an interrupted audit)")
    args = ap.parse_args(argv)

    profile = load_profile(args.profile)
    ctx = PlacementContext.for_profile(profile, make_predictor(args.predictor, profile,
                                                               seed=args.seed))
    verify = partial(verify_plans, profile=profile, duration_s=args.verify_duration,
                     seed=args.seed, workers=args.workers)
    workloads = audit_workloads(args.n, ctx, seed=args.seed)[args.start:args.limit]
    results = []
    unplanned: list[str] = []
    t0 = time.perf_counter()
    for i, w in enumerate(workloads):
        try:
            r = audit_plan(w, ctx, verify)
        except PlacementError as exc:  # no plan the twin accepts, even at a tight margin
            unplanned.append(w.name)
            print(json.dumps({"profile": profile.name, "predictor": args.predictor,
                              "workload": w.name, "error": str(exc)}), flush=True)
            print(f"[{i + 1}/{len(workloads)}] {w.name}: {exc}", file=sys.stderr)
            continue
        results.append(r)
        print(json.dumps({"profile": profile.name, "predictor": args.predictor, **r.to_dict()}),
              flush=True)
        print(f"[{i + 1}/{len(workloads)}] {w.name}: {r.replicas} replicas (predictor alone "
              f"{r.predicted_replicas}), twin min {r.twin_min}, bound {r.lower_bound}, starved "
              f"{r.starved}, plan {r.plan_s:.2f} s / {r.total_s:.1f} s verified "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print(json.dumps({"summary": True, "profile": profile.name, "predictor": args.predictor,
                      "seed": args.seed, "verify_duration_s": args.verify_duration,
                      **summary(results), "unplanned": unplanned,
                      "wall_s": round(time.perf_counter() - t0, 1),
                      "load_1m": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
