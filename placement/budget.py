"""A plan above the GPU budget is an error that says what the budget serves.

``check_budget`` raises when a plan needs more replicas than ``ctx.gpu_budget``, with the largest
fraction of the load (same adapters and mix) the policy plans within the budget
(``budget_fraction``: bisection on a rate multiplier, re-running the policy itself).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.plan import Plan
from twin.workload import Workload

BUDGET_SEARCH_STEPS = 7  # bisection steps on the load multiplier for the "what fits" message


class Placer(Protocol):
    """A placement policy as the budget check uses it (``placement.policy.PlacementPolicy``)."""

    name: str

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan: ...


def check_budget(plan: Plan, workload: Workload, ctx: PlacementContext, policy: Placer) -> None:
    """Error when the plan needs more replicas than the budget, saying what the budget serves."""
    budget = ctx.gpu_budget
    if budget is None or plan.replicas <= budget:
        return
    fraction = budget_fraction(workload, ctx, policy, budget)
    offered = workload.offered_tokens_per_s()
    bound = plan.lower_bound_replicas
    floor = (f"; even the lower bound is {bound}" if bound > budget else "")
    raise PlacementError(
        f"--gpu-budget {budget}: the {policy.name} plan for {workload.name!r} needs "
        f"{plan.replicas} replicas (lower bound {bound}{floor}). What fits in {budget}: about "
        f"{fraction * 100:.0f} % of this load with the same adapters and mix "
        f"({fraction * offered:,.0f} of {offered:,.0f} tok/s offered, "
        f"{fraction * workload.total_rate_rps:,.2f} of {workload.total_rate_rps:,.2f} req/s); "
        f"or raise --gpu-budget to {plan.replicas}"
    )


def budget_fraction(workload: Workload, ctx: PlacementContext, policy: Placer, budget: int
                    ) -> float:
    """Largest multiplier of the workload's rates the policy plans within ``budget`` replicas
    (bisection; a multiple of 1/2**BUDGET_SEARCH_STEPS)."""
    plain = replace(ctx, gpu_budget=None, lower_bound=None, estimate=None)
    lo, hi = 0.0, 1.0
    for _ in range(BUDGET_SEARCH_STEPS):
        mid = (lo + hi) / 2.0
        if policy.place(workload.scaled(mid), plain).replicas <= budget:
            lo = mid
        else:
            hi = mid
    return lo
