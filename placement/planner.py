"""One policy's plan for a workload: the entry every caller plans through.

``prepare`` validates the workload against the profile and computes the lower bound and the
capacity estimate once; ``make_plan`` runs the policy on it, records where the surrogate was
outside its domain, checks the GPU budget (an error that says what would fit) and times it.
Which of several plans to take is ``placement.choose``'s rule.
"""

from __future__ import annotations

import time
from dataclasses import replace

from placement.budget import check_budget
from placement.capacity_estimate import estimate_capacity
from placement.common import WorkloadIndex, check_servable
from placement.context import PlacementContext
from placement.lower_bound import compute_lower_bound
from placement.plan import Plan
from placement.policy import get_policy
from twin.workload import Workload


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
    check_budget(plan, workload, ctx, chosen)
    return plan
