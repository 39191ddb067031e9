"""``dlora``: dLoRA's proactive replication, maximising the minimum burst tolerance.

Source: Wu et al., "dLoRA: Dynamically Orchestrating Requests and Adapters for LoRA LLM
Serving" (OSDI'24), read from its description and from the port of its proactive mechanism that
Agulló et al. published for their comparison (arXiv 2602.24044); written here, not copied.

How the paper's mechanism is read. dLoRA places every adapter on some worker replicas and lets a
dispatcher send each request to the least-loaded replica that holds its adapter (with request
migration to fix the imbalance that remains). Proactively, ahead of bursts, it replicates
adapters: an adapter's *burst tolerance* is the serving capacity of the replicas that hold it
over its expected load; the mechanism repeatedly takes the adapter with the lowest burst
tolerance (in practice the hottest relative to its replicas) and adds a copy of it on the worker
with the fewest adapters, keeping the copy only if the minimum burst tolerance does not drop
(a copy costs the worker memory, hence throughput), until no copy helps. Capacity there is
estimated from the KV memory left after loading the adapters.

In a static plan the least-loaded dispatcher becomes routing weights that balance the replicas
holding each adapter, so an adapter's burst tolerance is the headroom (``replica_optimum``: the
largest multiplier of its load a replica stays feasible at) of the replicas serving it, and the
minimum over adapters is the minimum replica headroom. For N replicas:

1. **Initial placement.** Adapters hottest first, each on the replica with the fewest adapters
   (ties: least offered load), as dLoRA's engine order does; every adapter once.
2. **Measure.** Every replica's headroom h_j and capacity c_j = h_j x offered_j at its current
   mix, from the predictor (one batched search over all replicas per round).
3. **Replicate, hot first.** Each replica whose headroom is below the fleet's balanced headroom
   H = sum c / sum offered sheds its excess (offered - c / H): its heaviest adapters are copied
   to the replicas with the most headroom that lack them, as many as their spare at H needs
   (dLoRA adds one copy per step; a hot adapter gets the copies it needs in one round here).
4. **Dispatch.** Routing weights are rebalanced towards equal utilisation (offered / c) across
   each adapter's replicas (multiplicative updates: the fluid limit of least-loaded dispatch);
   weights below 1e-4 are dropped.
5. The round is kept if it raises the headroom vector in leximin order: the sorted headrooms
   compared from the lowest, the first one that moves by more than 0.2 % must rise. That is
   dLoRA's "keep a copy if the minimum burst tolerance does not drop" with a tolerance so it
   terminates, and it lets a hot adapter be copied while some other replica's headroom stays
   put (a replica the predictor finds infeasible at every load, headroom 0, would otherwise
   block every copy: zipf-5000's 55 req/s adapter was never replicated). Otherwise only the
   first copy is tried, then no copy (the dispatch rebalanced on the freshly measured
   capacities, which move as mixes change); if nothing helps the previous round stands and the
   search stops.

N is the smallest count (from the lower bound up) at which the predictor says no replica is
starved; each replica gets the per-replica optimum (max_loras within memory). dLoRA's dynamic
merging of adapters into the base weights and its request migration are runtime mechanisms
with no counterpart in a static vLLM plan and are left out, as is the padding of the initial
placement to N + n - 1 copies that its migration relies on.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from placement.baselines._shared import finish, prepare, search_count
from placement.common import ReplicaSpec, WorkloadIndex
from placement.context import PlacementContext
from placement.plan import Plan
from placement.replica_optimum import optimise
from twin.workload import Workload

MAX_ROUNDS = 16
COPIES_PER_SOURCE = 4  # adapters one overloaded replica copies away per round
BALANCE_STEPS = 80
MIN_WEIGHT = 1e-4  # a replica taking less of an adapter's traffic than this drops the adapter
IMPROVEMENT = 1.002  # a round must raise the headrooms (leximin) by 0.2 % to be kept
BELOW_BALANCED = 1.01  # replicas this far below the balanced headroom copy adapters away
ROUND_TOLERANCE = 0.05  # headroom search tolerance inside the rounds (the plan's final: ctx's)


@dataclass
class _Placement:
    """Adapter copies as parallel arrays: adapter position, replica, routing weight."""

    adapter: np.ndarray
    replica: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True)
class DLoraPolicy:
    """Proactive replication + balanced dispatch, fewest non-starved replicas (docstring)."""

    name: str = "dlora"

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan:
        started = time.perf_counter()
        index, ctx = prepare(workload, ctx)
        rounds_ctx = replace(ctx, headroom_tolerance=max(ctx.headroom_tolerance, ROUND_TOLERANCE))

        def assign(n: int) -> list[ReplicaSpec]:
            return _specs(index, replicate(index, rounds_ctx, n), n)

        specs = search_count(assign, index, ctx, lo=ctx.estimate.replicas)
        return finish(workload, ctx, self, specs, index, started)


def replicate(index: WorkloadIndex, ctx: PlacementContext, n: int) -> _Placement:
    """dLoRA's placement on ``n`` replicas (steps 1-5 of the module docstring)."""
    demand = index.offered_tps
    order = np.argsort(-demand, kind="stable")
    heap = [(0, 0.0, j) for j in range(n)]
    replica = np.empty(len(order), dtype=np.int64)
    for p in order.tolist():
        count, load, j = heapq.heappop(heap)
        replica[p] = j
        heapq.heappush(heap, (count + 1, load + float(demand[p]), j))
    best = _Placement(np.arange(len(order), dtype=np.int64), replica, np.ones(len(order)))
    head, cap = _measure(index, ctx, best, n)
    for _ in range(MAX_ROUNDS):
        copies = _proposals(best, demand, head, cap, n)
        trials = ([copies] if copies else []) + ([copies[:1]] if len(copies) > 1 else []) + [[]]
        kept = False
        for trial in trials:
            cand = _balance(_add(best, trial) if trial else best, demand, cap, n)
            h2, c2 = _measure(index, ctx, cand, n)
            if leximin_better(h2, head):
                best, head, cap, kept = cand, h2, c2, True
                break
        if not kept:
            break
    return best


def leximin_better(new: np.ndarray, old: np.ndarray, step: float = IMPROVEMENT) -> bool:
    """Whether headrooms ``new`` beat ``old`` in leximin order: sorted ascending, the first pair
    that differs by more than the factor ``step`` has ``new`` higher (infinite = empty)."""
    for a, b in zip(np.sort(new).tolist(), np.sort(old).tolist(), strict=True):
        if a == b or (math.isfinite(a) and math.isfinite(b) and max(a, b) <= min(a, b) * step):
            continue
        return a > b
    return False


def _measure(index: WorkloadIndex, ctx: PlacementContext, pl: _Placement, n: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per replica: headroom (inf when empty) and capacity in tokens/s (one batched search).
    A replica offered nothing (empty, or idle adapters only) is given the largest measured
    capacity: a fresh replica takes at least what the best loaded one does, roughly."""
    demand = index.offered_tps
    members = [np.flatnonzero(pl.replica == j) for j in range(n)]
    used = [j for j in range(n) if len(members[j])]
    optima = optimise(
        [index.load(pl.adapter[members[j]], pl.weight[members[j]]) for j in used], ctx
    )
    head = np.full(n, np.inf)
    cap = np.zeros(n)
    offered = np.bincount(pl.replica, weights=demand[pl.adapter] * pl.weight, minlength=n)
    for j, o in zip(used, optima, strict=True):
        head[j] = float(o.headroom or 0.0)
        cap[j] = head[j] * offered[j]
    loaded = offered > 0
    cap[~loaded] = cap[loaded].max() if loaded.any() else 1.0
    return head, np.maximum(cap, 1e-9)


def _proposals(pl: _Placement, demand: np.ndarray, head: np.ndarray, cap: np.ndarray, n: int
               ) -> list[tuple[int, int]]:
    """(adapter, target replica) copies for this round.

    H = sum c / sum offered is the headroom every replica would have if traffic could be spread
    freely. The worst replica, and every other one more than 5 % below H, sheds its excess
    (offered - c / H): its heaviest adapters (up to ``COPIES_PER_SOURCE``), each for the traffic
    it carries there, get copies on the replicas with the most spare at H (c / H - offered)
    until that spare covers it; spare is used up as it is promised.
    """
    traffic = demand[pl.adapter] * pl.weight
    offered = np.bincount(pl.replica, weights=traffic, minlength=n)
    if offered.sum() <= 0:
        return []
    balanced = float(cap.sum() / offered.sum())
    spare = np.maximum(cap / balanced - offered, 0.0)
    hosts = set(zip(pl.adapter.tolist(), pl.replica.tolist(), strict=True))
    out = []
    for order, j in enumerate(sorted(range(n), key=lambda j: (head[j], j))):
        if order > 0 and not head[j] * BELOW_BALANCED < balanced:
            break  # the worst replica always sheds (dLoRA: the lowest burst tolerance first)
        excess = offered[j] - cap[j] / balanced
        if excess <= 0:
            continue
        mine = np.flatnonzero(pl.replica == j)
        mine = mine[np.argsort(-traffic[mine], kind="stable")][:COPIES_PER_SOURCE]
        for a, carried in zip(pl.adapter[mine].tolist(), traffic[mine].tolist(), strict=True):
            need = min(excess, carried)
            for t in sorted(range(n), key=lambda t: (-spare[t], t)):
                if need <= 0 or spare[t] <= 0:
                    break
                if t == j or (a, t) in hosts:
                    continue
                take = min(need, float(spare[t]))
                out.append((a, t))
                hosts.add((a, t))
                spare[t] -= take
                need -= take
                excess -= take
            if excess <= 0:
                break
    return out


def _add(pl: _Placement, copies: list[tuple[int, int]]) -> _Placement:
    """New copies start with the mean weight of the adapter's existing ones (then renormalised)."""
    a = np.array([c[0] for c in copies], dtype=np.int64)
    mean = np.bincount(pl.adapter, weights=pl.weight) / np.bincount(pl.adapter)
    adapter = np.concatenate([pl.adapter, a])
    weight = np.concatenate([pl.weight, mean[a]])
    weight = weight / np.bincount(adapter, weights=weight)[adapter]
    target = np.array([c[1] for c in copies], dtype=np.int64)
    return _Placement(adapter, np.concatenate([pl.replica, target]), weight)


def _balance(pl: _Placement, demand: np.ndarray, cap: np.ndarray, n: int) -> _Placement:
    """Weights towards equal utilisation over each adapter's replicas (least-loaded dispatch in
    the fluid limit), then tiny weights dropped."""
    w = pl.weight.copy()
    d = demand[pl.adapter]
    for _ in range(BALANCE_STEPS):
        util = np.bincount(pl.replica, weights=d * w, minlength=n) / cap
        w = w / np.sqrt(np.maximum(util, 1e-9))[pl.replica]
        w = w / np.bincount(pl.adapter, weights=w)[pl.adapter]
    keep = w >= MIN_WEIGHT
    adapter, replica, w = pl.adapter[keep], pl.replica[keep], w[keep]
    return _Placement(adapter, replica, w / np.bincount(adapter, weights=w)[adapter])


def _specs(index: WorkloadIndex, pl: _Placement, n: int) -> list[ReplicaSpec]:
    ids = index.ids
    out = []
    for j in range(n):
        sel = np.flatnonzero(pl.replica == j)
        if len(sel):
            out.append(ReplicaSpec({ids[a]: float(w) for a, w in
                                    zip(pl.adapter[sel].tolist(), pl.weight[sel].tolist(),
                                        strict=True)}))
    return out
