"""``least_loaded``: hottest adapter first, each to the replica with the least offered load.

The classic load-balancing placement (Graham's LPT): adapters in decreasing offered tokens/s,
each to the replica currently offered the fewest tokens/s, so replicas end within one adapter's
load of each other. Rank- and slot-blind. N is the smallest count at which the predictor says no
replica is starved (search from the lower bound up, at most one replica per adapter); each
replica gets the per-replica optimum. An adapter too hot for one replica gets dedicated identical
copies first (``_shared.replicate_hot``): least-loaded assignment never splits an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.baselines._shared import place_dealt
from placement.common import WorkloadIndex, lpt_assign
from placement.context import PlacementContext
from placement.plan import Plan
from twin.workload import Workload


def deal_least_loaded(rest: np.ndarray, index: WorkloadIndex, k: int) -> list[list[int]]:
    """LPT over the adapters' offered tokens/s: each, largest first, to the lightest replica."""
    members: list[list[int]] = [[] for _ in range(k)]
    bins = lpt_assign(index.offered_tps[rest], k).tolist()
    for p, b in zip(rest.tolist(), bins, strict=True):
        members[b].append(p)
    return members


@dataclass(frozen=True)
class LeastLoadedPolicy:
    """Largest offered load first to the least-loaded replica (module docstring)."""

    name: str = "least_loaded"

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan:
        return place_dealt(workload, ctx, self, deal_least_loaded)
