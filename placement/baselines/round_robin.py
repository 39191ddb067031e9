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

from dataclasses import dataclass

import numpy as np

from placement.baselines._shared import place_dealt
from placement.common import WorkloadIndex
from placement.context import PlacementContext
from placement.plan import Plan
from twin.workload import Workload


def deal_round_robin(rest: np.ndarray, index: WorkloadIndex, k: int) -> list[list[int]]:
    """Adapter i (workload order) to replica i mod k."""
    return [rest[b::k].tolist() for b in range(min(k, len(rest)))]


@dataclass(frozen=True)
class RoundRobinPolicy:
    """Round-robin dealing, sized to the fewest non-starved replicas (module docstring)."""

    name: str = "round_robin"

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan:
        return place_dealt(workload, ctx, self, deal_round_robin)
