"""``least_loaded``: hottest adapter first, each to the replica with the least offered load.

The classic load-balancing placement (Graham's LPT): adapters in decreasing offered tokens/s,
each to the replica currently offered the fewest tokens/s, so replicas end within one adapter's
load of each other. Rank- and slot-blind. N is the smallest count at which the predictor says no
replica is starved (search from the lower bound up, at most one replica per adapter); each
replica gets the per-replica optimum. An adapter too hot for one replica gets dedicated identical
copies first (``_shared.replicate_hot``): least-loaded assignment never splits an adapter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from placement.baselines._shared import finish, prepare, replicate_hot, search_count
from placement.common import ReplicaSpec, lpt_assign
from placement.plan import Plan
from placement.policy import PlacementContext
from twin.workload import Workload


@dataclass(frozen=True)
class LeastLoadedPolicy:
    """Largest offered load first to the least-loaded replica (module docstring)."""

    name: str = "least_loaded"

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan:
        started = time.perf_counter()
        index, ctx = prepare(workload, ctx)
        hot = replicate_hot(index, ctx)
        specs = list(hot.dedicated)
        rest = hot.rest
        if len(rest):
            ids, sizes = index.ids, index.offered_tps[rest]

            def assign(k: int) -> list[ReplicaSpec]:
                members: list[list[int]] = [[] for _ in range(k)]
                for p, b in zip(rest.tolist(), lpt_assign(sizes, k).tolist(), strict=True):
                    members[b].append(p)
                return [ReplicaSpec({ids[p]: 1.0 for p in m}) for m in members if m]

            specs += search_count(assign, index, ctx, hi=len(rest),
                                  lo=ctx.lower_bound.replicas - hot.replicas)
        return finish(workload, ctx, self.name, specs, index, started)
