"""``agullo_greedy``: Agulló et al.'s greedy, starvation-aware packing, one replica at a time.

Source: Agulló et al., "Data-Driven Optimization of GPU efficiency for Distributed LLM-Adapter
Serving", arXiv 2602.24044, read from the paper's description of its placement and from the
code published with it; written here, not copied. Their pipeline predicts with a model
distilled from their Digital Twin whether a GPU serving a set of adapters starves; this policy
asks ``ctx.predictor`` the same question. The algorithm:

1. Adapters are grouped by rank (here the slot rank vLLM needs) and the groups are taken from
   the highest rank down, so high-rank adapters share GPUs with each other.
2. Within a group, adapters are ordered by rate in zig-zag: the hottest, the coldest, the second
   hottest, the second coldest... so every GPU gets a mix of hot and cold adapters.
3. One GPU at a time: adapters are added in that order while the predictor says the GPU, at its
   best max_loras within memory (their joint choice of slots), is not starved; at the first
   predicted starvation the GPU is closed and the next one opened, starting with the adapter
   that did not fit. When a group runs out, the open GPU carries on with the next (lower-rank)
   group, as in their code.

The replica count is what this produces (no search). Their code checks starvation at fixed
adapter counts (8, 16, 32, 64, 96, ...) and hands back the whole chunk since the last check on
starvation; here the exact largest non-starving prefix is found (prefixes on a geometric grid in
one batched predictor call, then bisection), which is the algorithm without that granularity
loss. An adapter too hot for a GPU on its own, which their algorithm cannot place, gets dedicated
identical copies first (``_shared.replicate_hot``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from placement.baselines._shared import finish, prepare, replicate_hot, slot_ranks
from placement.common import ReplicaSpec, WorkloadIndex
from placement.context import PlacementContext
from placement.plan import Plan
from placement.replica_optimum import optimise
from twin.workload import Workload

GRID_GROWTH = 1.5  # prefix sizes probed at once: 1, 2, 3, 4, 6, 9, 13, ...


@dataclass(frozen=True)
class AgulloGreedyPolicy:
    """Rank groups, zig-zag by rate, fill one replica until predicted starvation (docstring)."""

    name: str = "agullo_greedy"

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan:
        started = time.perf_counter()
        index, ctx = prepare(workload, ctx)
        hot = replicate_hot(index, ctx)
        specs = list(hot.dedicated)
        queue = greedy_order(index, hot.rest)
        start = 0
        while start < len(queue):
            m = _fill(index, ctx, queue[start:])
            specs.append(ReplicaSpec({index.ids[p]: 1.0 for p in queue[start:start + m]}))
            start += m
        return finish(workload, ctx, self, specs, index, started)


def zigzag(positions: np.ndarray, rates: np.ndarray) -> list[int]:
    """Hottest, coldest, second hottest, second coldest, ... (ties: workload order)."""
    asc = positions[np.lexsort((positions, rates[positions]))].tolist()
    out = []
    lo, hi = 0, len(asc) - 1
    while lo <= hi:
        out.append(asc[hi])
        hi -= 1
        if lo <= hi:
            out.append(asc[lo])
            lo += 1
    return out


def greedy_order(index: WorkloadIndex, positions: np.ndarray) -> list[int]:
    """The order adapters are offered to replicas: slot-rank groups from the highest down, each
    in zig-zag by rate."""
    slot = slot_ranks(index)[positions]
    out: list[int] = []
    for r in sorted(set(slot.tolist()), reverse=True):
        out += zigzag(positions[slot == r], index.rates)
    return out


def _fill(index: WorkloadIndex, ctx: PlacementContext, seq: list[int]) -> int:
    """How many of ``seq`` (from its start) the next replica takes: the prefix before the first
    one predicted infeasible; at least one (a lone adapter that starves is reported by the plan).
    """

    def feasible(sizes: list[int]) -> list[bool]:
        loads = [index.load(seq[:m], np.ones(m)) for m in sizes]
        return [o.feasible for o in optimise(loads, ctx, headroom=False)]

    grid = [1]
    while grid[-1] < len(seq):
        grid.append(min(len(seq), max(grid[-1] + 1, int(grid[-1] * GRID_GROWTH))))
    ok = feasible(grid)
    if all(ok):
        return len(seq)
    bad = ok.index(False)
    if bad == 0:
        return 1
    good, worse = grid[bad - 1], grid[bad]
    while worse - good > 1:
        mid = (good + worse) // 2
        if feasible([mid])[0]:
            good = mid
        else:
            worse = mid
    return good
