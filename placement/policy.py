"""The interface every placement policy implements, and the policy registry.

A policy turns a workload into a ``Plan``: ``policy.place(workload, ctx)`` with a
``placement.context.PlacementContext``. Adding a policy is one new module (a class with ``name``
and ``place``; build the plan with ``placement.common.build_plan``) plus one line in
``POLICIES`` below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol

from placement.baselines.agullo_greedy import AgulloGreedyPolicy
from placement.baselines.dlora import DLoraPolicy
from placement.baselines.least_loaded import LeastLoadedPolicy
from placement.baselines.loraserve import LoraServePolicy
from placement.baselines.round_robin import RoundRobinPolicy
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.packing import LorafleetPolicy
from placement.plan import Plan
from twin.workload import Workload


class PlacementPolicy(Protocol):
    """Decides groups, engine configs and routing for a workload; returns a complete Plan."""

    name: str

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan: ...


PolicyFactory = Callable[[], PlacementPolicy]

# One line per policy.
POLICIES: Mapping[str, PolicyFactory] = MappingProxyType(
    {
        "lorafleet": LorafleetPolicy,
        "round_robin": RoundRobinPolicy,
        "least_loaded": LeastLoadedPolicy,
        "loraserve": LoraServePolicy,
        "dlora": DLoraPolicy,
        "agullo_greedy": AgulloGreedyPolicy,
    }
)


def get_policy(name: str) -> PlacementPolicy:
    """The registered policy called ``name``; an error lists the known names."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise PlacementError(
            f"policy: unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}"
        ) from None
    return factory()
