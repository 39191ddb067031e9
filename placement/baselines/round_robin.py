"""``round_robin``: adapters dealt round-robin over N replicas, N as small as the predictor allows.

The placement every multi-LoRA deployment starts from: adapter i (workload order) goes to
replica i mod N, blind to rates and ranks. N is the smallest count at which the predictor says
no replica is starved or below ``min_served_fraction`` (search from the lower bound up, at most
one replica per adapter). Each replica gets the per-replica optimum (max_loras within memory,
max_lora_rank of its largest adapter), like every policy here, so the comparison is about
placement only. Round robin never splits an adapter: one too hot for a replica on its own gets
dedicated identical copies first (``_shared.replicate_hot``), and the rest is dealt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from placement.baselines._shared import finish, prepare, replicate_hot, search_count
from placement.common import ReplicaSpec
from placement.plan import Plan
from placement.policy import PlacementContext
from twin.workload import Workload


@dataclass(frozen=True)
class RoundRobinPolicy:
    """Round-robin dealing, sized to the fewest non-starved replicas (module docstring)."""

    name: str = "round_robin"

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan:
        started = time.perf_counter()
        index, ctx = prepare(workload, ctx)
        hot = replicate_hot(index, ctx)
        specs = list(hot.dedicated)
        rest = hot.rest
        if len(rest):
            ids = index.ids

            def assign(k: int) -> list[ReplicaSpec]:
                return [ReplicaSpec({ids[p]: 1.0 for p in rest[b::k].tolist()})
                        for b in range(min(k, len(rest)))]

            specs += search_count(assign, index, ctx, hi=len(rest),
                                  lo=ctx.lower_bound.replicas - hot.replicas)
        return finish(workload, ctx, self.name, specs, index, started)
