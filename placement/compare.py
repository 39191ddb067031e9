"""Every registered policy's plan on one workload, side by side (``lorafleet plan --compare``).

Each policy plans once; unless told not to, every plan is verified with full twin runs in one
pool, so the comparison rests on the twin, not on the predictor the policies planned with, and
lorafleet's plan is tightened on the twin by the same rule as every other caller's
(``placement.choose.settle``). Baselines are reported as published.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from placement.budget import check_budget
from placement.capacity_estimate import CapacityEstimate
from placement.choose import Candidate, ChoiceRule, settle
from placement.context import PlacementContext
from placement.lower_bound import LowerBound
from placement.plan import Plan
from placement.planner import make_plan, prepare
from placement.policy import POLICIES, get_policy
from placement.verify import VERIFY_DURATION_S, Progress, verify_plans
from twin.workload import Workload


@dataclass(frozen=True)
class Comparison:
    """Every policy's plan on one workload, the shared lower bound and capacity estimate."""

    lower_bound: LowerBound
    plans: dict[str, Plan]
    lower_bound_wall_s: float
    estimate: CapacityEstimate | None = None

    def to_dict(self) -> dict[str, Any]:
        """The `lorafleet plan --compare --json` object."""
        return {
            "lower_bound_replicas": self.lower_bound.replicas,
            "capacity_estimate_replicas": self.estimate.replicas if self.estimate else None,
            "policies": {name: policy_summary(plan) for name, plan in self.plans.items()},
        }


def compare(
    workload: Workload,
    ctx: PlacementContext,
    policies: Sequence[str] | None = None,
    *,
    verify: bool = True,
    duration_s: float = VERIFY_DURATION_S,
    seed: int = 0,
    workers: int = 2,
    progress: Progress | None = None,
) -> Comparison:
    """Plan with every policy (default: all registered), then verify all plans in one pool.

    With a GPU budget, the error is raised only if no policy fits within it.
    """
    names = list(policies) if policies is not None else sorted(POLICIES)
    t0 = time.perf_counter()
    budget = ctx.gpu_budget
    ctx = prepare(workload, replace(ctx, gpu_budget=None))
    bound_wall = time.perf_counter() - t0
    plans: dict[str, Plan] = {}
    for name in names:
        plans[name] = make_plan(workload, ctx, name)
    if budget is not None and min(p.replicas for p in plans.values()) > budget:
        best = min(plans, key=lambda n: plans[n].replicas)
        check_budget(plans[best], workload, replace(ctx, gpu_budget=budget), get_policy(best))
    if verify:
        def twin(batch: Sequence[Plan]) -> list[Plan]:
            return verify_plans(batch, ctx.profile, duration_s=duration_s, seed=seed,
                                workers=workers, progress=progress)

        cands = [Candidate(name, plan, ctx.target_utilisation) for name, plan in plans.items()]
        settled = settle(cands, workload, ctx, twin, ChoiceRule())
        plans = {c.label: c.plan for c in settled}
    return Comparison(lower_bound=ctx.lower_bound, plans=plans,
                      lower_bound_wall_s=round(bound_wall, 4), estimate=ctx.estimate)


def policy_summary(plan: Plan) -> dict[str, Any]:
    """One policy's line of the comparison (twin-verified figures when the plan is verified).

    ``ttft_p99_ms`` is the worst replica's p99 (an upper bound on the fleet's p99);
    ``offered_total_tps`` is what the replicas were offered in the same runs.
    """
    src = plan.metrics_source()
    ttft = plan.worst("ttft_p99_ms", src)
    return {
        "replicas": plan.replicas,
        "starved_replicas": plan.starved_replicas(src),
        "verified_total_throughput_tps": plan.total("total_throughput_tps", "verified")
        if plan.is_verified else None,
        "offered_total_tps": plan.total("offered_total_tps", src),
        "ttft_p99_ms": ttft if math.isfinite(ttft) else None,
        "plan_wall_s": plan.plan_wall_s,
    }
