"""``loraserve``: LoRAServe's rank-aware fractional packing at per-rank operating points.

Source: Jaiswal et al., "Serving Heterogeneous LoRA Adapters in Distributed LLM Inference
Systems" (LoRAServe), arXiv 2511.22880, read from its abstract and algorithm description and
from the port Agulló et al. published for their comparison (arXiv 2602.24044); written here, not
copied. LoRAServe keeps adapters of different ranks apart, because co-batching a high-rank
adapter slows every request in the batch, and splits an adapter's traffic over several GPUs
when it needs more than one. Its placement for N servers, as read:

1. **Operating points.** OP_R = the tokens/s one server sustains serving only rank-R adapters
   (measured offline in the paper). Here: from the predictor, via the lower bound's figures for
   the rank class's whole mix (``operating_points``): its best single-replica throughput, or
   fewer tokens when the class has more adapters than one replica's slots serve, times
   ``target_utilisation``. Ranks are slot ranks (the smallest max_lora_rank vLLM accepts).
2. **Budgets.** util_R = demand_R / OP_R; target = sum(util_R) / N; rank R gets
   round(util_R / target) servers, apportioned by largest remainder so they sum to N.
3. **Fractional packing, highest rank first.** Within a rank's servers, adapters in decreasing
   demand fill the least-loaded server up to target x OP_R and spill the rest of their traffic
   to the next; an adapter bigger than that capacity is split over several servers.
4. **Leftovers** (ranks with no budget, spill beyond the rank's servers) go whole to the
   least-utilised server (load over the operating point of its largest rank) among those whose
   largest rank is at least theirs (any server if none). The port ranks servers by raw load,
   which sends every leftover to the rank-64 server (its load is the smallest because its
   operating point is); utilisation is what the paper's budgets reason in.
5. Routing weights = the traffic fractions (phi); LoRAServe's churn-minimising permutation
   across time steps does not apply to one plan.

N is the smallest count (from max(lower bound, ceil(sum util_R)) up) at which the predictor says
no server is starved; each server gets the per-replica optimum (max_loras within memory). Its
remote-adapter access over GPUDirect RDMA has no counterpart in a vLLM fleet and is left out.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

import numpy as np

from placement.baselines._shared import finish, prepare, search_count, slot_ranks
from placement.common import ReplicaSpec
from placement.context import PlacementContext
from placement.plan import Plan
from twin.workload import Workload

ROOM_EPS = 1e-4  # a server with less room than this fraction of its capacity counts as full
SLIVER = 1e-6  # a remainder below this fraction of an adapter's traffic joins its last fragment


@dataclass(frozen=True)
class LoraServePolicy:
    """Rank budgets + fractional bin packing at per-rank operating points (module docstring)."""

    name: str = "loraserve"

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan:
        started = time.perf_counter()
        index, ctx = prepare(workload, ctx)
        slot = slot_ranks(index)
        demand = index.offered_tps
        ops = operating_points(ctx, sorted(set(slot.tolist())))
        total_util = sum(float(demand[slot == r].sum()) / op for r, op in ops.items())

        def assign(n: int) -> list[ReplicaSpec]:
            shares = fractional_placement(slot, demand, ops, n)
            return [ReplicaSpec({index.ids[p]: phi for p, phi in s.items()}) for s in shares if s]

        lo = max(ctx.estimate.replicas, math.ceil(total_util - 1e-9))
        specs = search_count(assign, index, ctx, lo=lo)
        return finish(workload, ctx, self, specs, index, started)


def operating_points(ctx: PlacementContext, ranks: list[int]) -> dict[int, float]:
    """OP_R (tokens/s) per slot rank: what one replica sustains on the rank class's own mix, from
    the capacity estimate's figures for the whole class: its best single-replica throughput C_R, or
    less when the class has more adapters than one replica serves (m_R, e.g. 61 slots at rank
    64 on an H100): OP_R = O_R / max(O_R / C_R, n_R / (m_R + 1)), at the utilisation target. A
    class without one (no load) borrows the smallest known, so it still gets a budget weight."""
    bound = ctx.estimate
    assert bound is not None
    ops = dict.fromkeys(ranks, 0.0)
    for c in bound.classes:
        if c.max_lora_rank in ops and c.offered_tps > 0 and c.capacity_tps > 0:
            need = max(c.offered_tps / c.capacity_tps, c.n_adapters / (c.adapters_per_replica + 1))
            ops[c.max_lora_rank] = c.offered_tps / need * ctx.target_utilisation
    known = [op for op in ops.values() if op > 0]
    fallback = min(known) if known else 1.0
    return {r: op if op > 0 else fallback for r, op in ops.items()}


def apportion(weights: dict[int, float], total: int) -> dict[int, int]:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainder; ties to the
    higher rank)."""
    positive = {r: w for r, w in weights.items() if w > 0}
    out = dict.fromkeys(weights, 0)
    if total <= 0 or not positive:
        return out
    s = sum(positive.values())
    quota = {r: w / s * total for r, w in positive.items()}
    for r, q in quota.items():
        out[r] = math.floor(q)
    left = total - sum(out.values())
    by_remainder = sorted(positive, key=lambda r: (-(quota[r] - math.floor(quota[r])), -r))
    for i in range(left):
        out[by_remainder[i % len(by_remainder)]] += 1
    return out


def fractional_placement(
    slot: np.ndarray, demand: np.ndarray, ops: dict[int, float], n: int
) -> list[dict[int, float]]:
    """LoRAServe's placement on ``n`` servers: per server, adapter position -> traffic fraction
    (steps 2-4 of the module docstring). Fractions of each adapter sum to 1."""
    ranks = sorted(ops, reverse=True)
    util = {r: float(demand[slot == r].sum()) / ops[r] for r in ranks}
    target = sum(util.values()) / n
    budget = apportion({r: (u / target if target > 0 else 0.0) for r, u in util.items()}, n)
    load = [0.0] * n
    top = [0] * n  # largest slot rank on each server
    shares: list[dict[int, float]] = [{} for _ in range(n)]

    def put(j: int, p: int, phi: float, tps: float, rank: int) -> None:
        shares[j][p] = shares[j].get(p, 0.0) + phi
        load[j] += tps
        top[j] = max(top[j], rank)

    leftovers: list[tuple[int, int, float]] = []  # (rank, position, fraction left)
    first = 0
    for r in ranks:
        members = np.flatnonzero(slot == r)
        members = members[np.argsort(-demand[members], kind="stable")].tolist()
        servers = list(range(first, first + budget[r]))
        first += budget[r]
        if not servers:
            leftovers += [(r, p, 1.0) for p in members]
            continue
        cap = target * ops[r]
        heap = [(0.0, j) for j in servers]
        for p in members:
            total = float(demand[p])
            if total <= 0.0:
                put(heap[0][1], p, 1.0, 0.0, r)
                continue
            remaining = total
            while remaining > 0.0:
                j = heap[0][1]
                room = cap - load[j]
                if room <= ROOM_EPS * cap:
                    break  # the least-loaded server is full: all are
                take = min(room, remaining)
                if remaining - take <= SLIVER * total:
                    take = remaining
                put(j, p, take / total, take, r)
                heapq.heapreplace(heap, (load[j], j))
                remaining -= take
            if remaining > 0.0:
                leftovers.append((r, p, remaining / total))

    for r, p, phi in sorted(leftovers, key=lambda x: -x[0]):  # stable: demand order kept
        fits = [j for j in range(n) if top[j] >= r] or list(range(n))
        j = min(fits, key=lambda k: (load[k] / ops.get(top[k], ops[r]), k))
        put(j, p, phi, phi * float(demand[p]), r)

    totals: dict[int, float] = {}
    for s in shares:
        for p, phi in s.items():
            totals[p] = totals.get(p, 0.0) + phi
    return [{p: phi / totals[p] for p, phi in s.items()} for s in shares]
