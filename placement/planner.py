"""One policy's plan for a workload: the entry every caller plans through.

``prepare`` validates the workload against the profile and computes the lower bound and the
capacity estimate once; ``make_plan`` runs the policy on it, records where the surrogate was
outside its domain, checks the GPU budget (an error that says what would fit) and times it.
``make_plan_within`` is the policy's packing on at most k replicas (the twin may accept fewer
replicas than the predictor packs for). Which of several plans to take is ``placement.choose``'s
rule.
"""

from __future__ import annotations

import time
from dataclasses import replace

from placement.budget import check_budget
from placement.capacity_estimate import estimate_capacity
from placement.common import ReplicaSpec, WorkloadIndex, build_plan, check_servable
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.lower_bound import compute_lower_bound
from placement.plan import Plan
from placement.policy import get_policy
from twin.workload import Workload

SCALE_STEPS = 10  # bisection steps on the load scale that gives a packing of <= k replicas


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
        extra: dict = {}
        if report["predictions"]:  # the twin judged what the surrogate was not trained on
            extra = {"outside_domain_predictions": report["predictions"],
                     "outside_domain_twin_runs": report["twin_runs"],
                     "outside_domain_features": ",".join(sorted(report["outside"]))}
        if report.get("light_load"):  # light loads read at the no-queue figure
            extra["light_load_predictions"] = report["light_load"]
        if extra:
            plan = replace(plan, settings={**plan.settings, **extra})
    check_budget(plan, workload, ctx, chosen)
    return plan


def make_plan_within(workload: Workload, ctx: PlacementContext, k: int,
                     policy: str = "lorafleet") -> Plan | None:
    """The ``policy`` packing of ``workload`` on at most ``k`` replicas: its packing of the
    workload scaled down (bisection on the scale) until it needs no more than ``k``, then each
    replica's engine config chosen again for the real load (what the predictor then thinks of
    it is in the plan; the twin is the judge). None when even a sliver of the load needs more
    than ``k``. Its ``plan_wall_s`` is this whole search's."""
    started = time.perf_counter()
    lo, hi, found = 0.0, 1.0, None
    for _ in range(SCALE_STEPS):
        mid = (lo + hi) / 2.0
        try:
            p = make_plan(workload.scaled(mid), replace(ctx, lower_bound=None, estimate=None),
                          policy)
        except PlacementError:
            hi = mid
            continue
        if p.replicas <= k:
            lo, found = mid, p
        else:
            hi = mid
    if found is None:
        return None
    specs = [ReplicaSpec({a.id: r.weight / g.copies for a in g.adapters
                          for r in found.routing[a.id] if r.group == g.name},
                         copies=g.copies, name=g.name) for g in found.groups]
    plan = build_plan(workload, ctx, policy, specs)
    return replace(plan, plan_wall_s=round(time.perf_counter() - started, 4))
