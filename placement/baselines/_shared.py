"""What the baselines share beyond ``placement.common``: the lower bound on the context, the
paper-free treatment of adapters too hot for one replica, the replica-count search and the GPU
budget check. (Kept here rather than in ``placement/common.py``, which the placement core owns.)
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from placement.budget import Placer, check_budget
from placement.capacity_estimate import estimate_capacity
from placement.common import (
    ReplicaSpec,
    WorkloadIndex,
    build_plan,
    check_servable,
    specs_feasible,
)
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.plan import Plan
from placement.replica_optimum import (
    MIN_SCALE,
    engine_config,
    is_feasible,
    max_feasible_scale,
    scaled_load,
)
from twin.config import VALID_MAX_LORA_RANKS, EngineConfig
from twin.workload import Workload

SCAN_WINDOW = 8  # counts search_count tries one by one next to the bound and its answer
MAX_OVER_BOUND = 8  # search_count stops at this many times the capacity estimate


def prepare(workload: Workload, ctx: PlacementContext) -> tuple[WorkloadIndex, PlacementContext]:
    """Every baseline's first step: reject unservable workloads, index the adapters, and carry
    the capacity estimate on the context (computed once here when the planner did not): the
    baselines search their replica count from it, as published."""
    check_servable(workload, ctx)
    index = WorkloadIndex(workload)
    if ctx.estimate is None:
        ctx = replace(ctx, estimate=estimate_capacity(workload, ctx, index=index))
    return index, ctx


def slot_ranks(index: WorkloadIndex) -> np.ndarray:
    """Per adapter, the smallest max_lora_rank vLLM accepts that holds it (``check_servable``
    has already rejected ranks beyond the largest)."""
    valid = np.array(VALID_MAX_LORA_RANKS, dtype=np.int64)
    return valid[np.searchsorted(valid, index.ranks)]


@dataclass(frozen=True)
class HotSplit:
    """Dedicated groups for adapters too hot for one replica, and the adapters left to place."""

    dedicated: list[ReplicaSpec]
    rest: np.ndarray  # adapter positions, workload order

    @property
    def replicas(self) -> int:
        return sum(s.copies for s in self.dedicated)


def replicate_hot(index: WorkloadIndex, ctx: PlacementContext) -> HotSplit:
    """The default for baselines whose papers never split an adapter (round robin, least loaded,
    Agulló et al.'s greedy): an adapter that one replica cannot serve alone (predicted infeasible
    at max_loras=1) gets k = ceil(1 / s) identical dedicated replicas, each taking 1/k of its
    traffic, s the largest feasible multiplier of its load. That is how a server scales one model
    past a GPU (data-parallel copies); the alternative, a plan with a starved replica, would make
    these baselines fail on any skewed workload for a reason their papers do not address.

    One batched predictor call over every adapter alone, then one headroom search over the hot
    ones. An adapter of which not even 1/1024 is feasible is an error naming it.
    """
    n = len(index.ids)
    loads = [index.load([p], [1.0]) for p in range(n)]
    by_rank: dict[int, EngineConfig] = {}
    configs = []
    for ld in loads:
        rank = int(ld.ranks[0])
        if rank not in by_rank:
            by_rank[rank] = engine_config(ctx, ld, 1)
        configs.append(by_rank[rank])
    judged = [scaled_load(ld, 1.0 / ctx.target_utilisation) for ld in loads]
    preds = ctx.predictor.predict(judged, configs)
    hot = [p for p, pred in enumerate(preds) if not is_feasible(pred, ctx)]
    if not hot:
        return HotSplit([], np.arange(n, dtype=np.int64))
    scale = max_feasible_scale([judged[p] for p in hot], [configs[p] for p in hot], ctx)
    dedicated = []
    for k, (p, s) in enumerate(zip(hot, scale.tolist(), strict=True)):
        if s <= 0.0:
            raise PlacementError(
                f"adapter {index.ids[p]!r}: not even 1/{round(1 / MIN_SCALE)} of its "
                f"{index.offered_tps[p]:,.0f} tok/s is feasible on one replica at max_loras=1 "
                f"on {ctx.profile.name}; lower its rate or check the predictor"
            )
        copies = max(2, math.ceil(1.0 / s))
        dedicated.append(ReplicaSpec({index.ids[p]: 1.0 / copies}, copies=copies,
                                     name=hot_name(index.ids[p], k)))
    keep = np.ones(n, dtype=bool)
    keep[hot] = False
    return HotSplit(dedicated, np.flatnonzero(keep))


def hot_name(adapter: str, k: int) -> str:
    """``hot-<adapter id>`` made a valid, unique group name (ids may hold '/', spaces...)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", adapter).strip("-.")[:48]
    return f"hot-{clean}" if clean == adapter else f"hot{k}-{clean or 'adapter'}"


def search_count(
    assign: Callable[[int], list[ReplicaSpec]],
    index: WorkloadIndex,
    ctx: PlacementContext,
    *,
    lo: int,
    hi: int | None = None,
    window: int = SCAN_WINDOW,
) -> list[ReplicaSpec]:
    """Specs of the smallest replica count k >= lo at which ``assign(k)`` has no infeasible
    replica; if none up to ``hi``, hi's, whose starved replicas the plan then reports.

    ``hi`` is at most ``MAX_OVER_BOUND`` x the lower bound (and 4 x the adapters): a policy
    that needs more is reported there with its starved replicas rather than searched on to
    thousands of replicas. (With the surrogate, whose served fraction of a lightly loaded
    replica reads a few percent low, dealing 5,000 adapters onto ever more replicas always
    found one failing the 99 % rule: least loaded reached 4,617 replicas on zipf-5000.)

    A baseline's feasibility need not be monotone in k (round-robin dealing and LoRAServe's rank
    budgets change pattern with k: on zipf-200 LoRAServe fits 3 replicas but not 4 or 5), so a
    plain bisection can miss the smallest k. Hence: (1) every count in [lo, lo + window) in
    order, in growing batches (1, 2, 4, ... counts per predictor call); (2) beyond, doubling then
    bisection, as ``placement.common.size_replicas``; (3) the ``window`` counts below the
    bisection's answer in one call. Exact whenever the smallest feasible count lies within a
    window of the bound or of the bisection's answer.
    """
    limit = max(4 * len(index.ids), 2 * lo)
    if ctx.estimate is not None:
        limit = min(limit, max(2 * lo, MAX_OVER_BOUND * ctx.estimate.replicas))
    hi = max(1, min(hi, limit) if hi is not None else limit)
    lo = max(1, min(lo, hi))
    tried: dict[int, list[ReplicaSpec]] = {}
    ok: dict[int, bool] = {}

    def probe(counts: list[int]) -> int | None:
        """Feasibility of the counts not yet known (one predictor call); the first feasible."""
        new = [c for c in counts if c not in ok]
        for c in new:
            tried[c] = assign(c)
        flags = specs_feasible([s for c in new for s in tried[c]], index, ctx)
        start = 0
        for c in new:
            ok[c] = all(flags[start:start + len(tried[c])])
            start += len(tried[c])
        return next((c for c in counts if ok[c]), None)

    k, batch, top = lo, 1, min(hi, lo + max(1, window) - 1)
    while k <= top:  # (1)
        found = probe(list(range(k, min(top, k + batch - 1) + 1)))
        if found is not None:
            return tried[found]
        k, batch = min(top, k + batch - 1) + 1, 2 * batch
    if k > hi:
        return tried[hi]
    bad, good = k - 1, None
    while good is None:  # (2)
        if probe([k]) is not None:
            good = k
        elif k >= hi:
            return tried[hi]
        else:
            bad, k = k, min(hi, 2 * k)
    while good - bad > 1:
        mid = (good + bad) // 2
        if probe([mid]) is not None:
            good = mid
        else:
            bad = mid
    below = [c for c in range(max(top + 1, good - window), good) if c not in ok]  # (3)
    found = probe(below) if below else None
    return tried[found if found is not None else good]


def finish(
    workload: Workload,
    ctx: PlacementContext,
    policy: Placer,
    specs: list[ReplicaSpec],
    index: WorkloadIndex,
    started: float,
) -> Plan:
    """The plan (``build_plan``), refused above ``ctx.gpu_budget`` with the planner's own
    "what fits" error, so a policy called directly honours the budget too."""
    plan = build_plan(workload, ctx, policy.name, specs, index=index, started=started)
    if ctx.gpu_budget is not None and plan.replicas > ctx.gpu_budget:
        check_budget(plan, workload, ctx, policy)
    return plan


Deal = Callable[[np.ndarray, WorkloadIndex, int], list[list[int]]]


def place_dealt(workload: Workload, ctx: PlacementContext, policy: Placer, deal: Deal) -> Plan:
    """The frame of the count-searching baselines: adapters too hot for one replica get
    dedicated copies, the rest (positions ``rest``) is dealt into k replicas by
    ``deal(rest, index, k)``, k the fewest the predictor finds unstarved."""
    started = time.perf_counter()
    index, ctx = prepare(workload, ctx)
    hot = replicate_hot(index, ctx)
    specs = list(hot.dedicated)
    rest = hot.rest
    if len(rest):
        ids = index.ids

        def assign(k: int) -> list[ReplicaSpec]:
            return [ReplicaSpec({ids[p]: 1.0 for p in b}) for b in deal(rest, index, k) if b]

        specs += search_count(assign, index, ctx, hi=len(rest),
                              lo=ctx.estimate.replicas - hot.replicas)
    return finish(workload, ctx, policy, specs, index, started)
