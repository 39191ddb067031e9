"""Planning entry points for the CLI and benchmarks: one policy, or every policy side by side.

``make_plan`` computes the lower bound once, runs the policy, checks the GPU budget (an error
that says what would fit) and times it. ``compare`` does that for every registered policy and,
unless told not to, verifies every plan with full twin runs so the comparison rests on the twin,
not on the predictor the policies planned with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from placement.capacity_estimate import CapacityEstimate, estimate_capacity
from placement.common import WorkloadIndex, check_servable
from placement.errors import PlacementError
from placement.lower_bound import LowerBound, compute_lower_bound
from placement.plan import Plan
from placement.policy import POLICIES, PlacementContext, get_policy
from placement.verify import VERIFY_DURATION_S, Progress, verify_plans
from twin.workload import Workload

BUDGET_SEARCH_STEPS = 7  # bisection steps on the load multiplier for the "what fits" message
# policies whose verified plan is re-planned at a tighter margin while the twin starves a
# replica: lorafleet's own rule ("no starved replica"), not the baselines' (as published)
SETTLES_ON_TWIN: frozenset[str] = frozenset({"lorafleet"})
SETTLE_TIGHTENING = 0.95  # each round plans at this factor of the margin the last plan used
SETTLE_ROUNDS = 3


def prepare(workload: Workload, ctx: PlacementContext) -> PlacementContext:
    """Validate the workload against the profile and attach the lower bound and the capacity
    estimate to the context."""
    check_servable(workload, ctx)
    if ctx.lower_bound is None:
        ctx = replace(ctx, lower_bound=compute_lower_bound(workload, ctx))
    if ctx.estimate is None:
        ctx = replace(ctx, estimate=estimate_capacity(workload, ctx,
                                                      index=WorkloadIndex(workload)))
    return ctx


def make_plan(workload: Workload, ctx: PlacementContext, policy: str = "lorafleet") -> Plan:
    """The plan of ``policy`` for ``workload``; PlacementError if it exceeds ``ctx.gpu_budget``."""
    chosen = get_policy(policy)
    domain = getattr(ctx.predictor, "domain_report", None)  # placement.predictors.DomainGuard
    if domain is not None:
        domain(reset=True)
    ctx = prepare(workload, ctx)
    started = time.perf_counter()
    plan = chosen.place(workload, ctx)
    plan = replace(plan, plan_wall_s=round(time.perf_counter() - started, 4))
    if domain is not None:
        report = domain(reset=True)
        if report["predictions"]:  # the twin judged what the surrogate was not trained on
            plan = replace(plan, settings={
                **plan.settings, "outside_domain_predictions": report["predictions"],
                "outside_domain_twin_runs": report["twin_runs"],
                "outside_domain_features": ",".join(sorted(report["outside"]))})
    check_budget(plan, workload, ctx, policy)
    return plan


def check_budget(plan: Plan, workload: Workload, ctx: PlacementContext, policy: str) -> None:
    """Error when the plan needs more replicas than the budget, saying what the budget serves."""
    budget = ctx.gpu_budget
    if budget is None or plan.replicas <= budget:
        return
    fraction = budget_fraction(workload, ctx, policy, budget)
    offered = workload.offered_tokens_per_s()
    bound = plan.lower_bound_replicas
    floor = (f"; even the lower bound is {bound}" if bound > budget else "")
    raise PlacementError(
        f"--gpu-budget {budget}: the {policy} plan for {workload.name!r} needs {plan.replicas} "
        f"replicas (lower bound {bound}{floor}). What fits in {budget}: about "
        f"{fraction * 100:.0f} % of this load with the same adapters and mix "
        f"({fraction * offered:,.0f} of {offered:,.0f} tok/s offered, "
        f"{fraction * workload.total_rate_rps:,.2f} of {workload.total_rate_rps:,.2f} req/s); "
        f"or raise --gpu-budget to {plan.replicas}"
    )


def budget_fraction(workload: Workload, ctx: PlacementContext, policy: str, budget: int) -> float:
    """Largest multiplier of the workload's rates the policy plans within ``budget`` replicas
    (bisection; a multiple of 1/2**BUDGET_SEARCH_STEPS)."""
    plain = replace(ctx, gpu_budget=None, lower_bound=None, estimate=None)
    lo, hi = 0.0, 1.0
    for _ in range(BUDGET_SEARCH_STEPS):
        mid = (lo + hi) / 2.0
        if get_policy(policy).place(workload.scaled(mid), plain).replicas <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def verify_and_settle(
    plan: Plan, workload: Workload, ctx: PlacementContext, **verify_kw: Any
) -> Plan:
    """``plan`` verified by full twin runs (unless it already is); for a policy in
    ``SETTLES_ON_TWIN``, while the twin finds a starved replica, the workload is planned again
    at a tighter target utilisation (``SETTLE_TIGHTENING`` x the one the plan used, i.e. after
    its margin step) and verified again, at most ``SETTLE_ROUNDS`` times. The predictor packs
    to the edge of what *it* believes; the twin is the ground truth, so a replica it starves
    costs a replica more, not a starved plan. After the last round the plan is returned with
    its starved replicas, which every report shows."""
    checked = plan if plan.is_verified else verify_plans([plan], ctx.profile, **verify_kw)[0]
    if plan.policy not in SETTLES_ON_TWIN:
        return checked
    for _ in range(SETTLE_ROUNDS):
        if checked.starved_replicas() == 0:
            break
        used = float(checked.settings.get("target_utilisation", ctx.target_utilisation))
        tighter = replace(ctx, target_utilisation=round(used * SETTLE_TIGHTENING, 4))
        checked = verify_plans([make_plan(workload, tighter, plan.policy)], ctx.profile,
                               **verify_kw)[0]
    return checked


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
        check_budget(plans[best], workload, replace(ctx, gpu_budget=budget), best)
    if verify:
        verify_kw: dict[str, Any] = {"duration_s": duration_s, "seed": seed, "workers": workers,
                                     "progress": progress}
        checked = verify_plans(list(plans.values()), ctx.profile, **verify_kw)
        plans = dict(zip(plans, checked, strict=True))
        for name in SETTLES_ON_TWIN & set(plans):
            plans[name] = verify_and_settle(plans[name], workload, ctx, **verify_kw)
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
