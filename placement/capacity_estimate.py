"""How many replicas a workload's mix needs, estimated with the planner's own predictor:
offered token load / the best throughput one replica reaches on that mix. Packing starts its
search from it and reads its per-class capacity and adapters-per-replica; the baselines search
from it as published. It is an *estimate*, not a bound: it is judged with the predictor (a
surrogate outside its domain once put it at 73 where one replica served) and assumes replicas
that look like the workload's mix. The bound printed with every plan is
``placement.lower_bound`` (a bound by construction).

"Best single-replica throughput for that mix" is made precise as follows
(docs/placement.md#capacity-estimate):

1. Per rank class. A replica's max_lora_rank is the largest slot rank among its adapters and
   sets its memory and step cost, so rank-8 adapters can be served on cheaper replicas than
   rank-64 ones. Adapters are grouped by slot rank R (the smallest rank vLLM accepts that holds
   them); the fleet needs at least sum_R k_R replicas, k_R the bound for class R on its own.
2. The mix. A replica's capacity depends on how many adapters it holds *and* on their actual
   rates: a cold adapter brings few tokens but takes a LoRA slot whenever one of its requests
   runs, so scaling a few adapters' rates up ("saturating" them) would overstate what a replica
   holding many cold adapters can do. The mix of class R at size m is therefore a slice: m
   adapters sampled evenly in rate order (every (n/m)-th, hot and cold as in the class; beyond
   m = n the class's adapters repeated) with rates scaled so the slice carries exactly m/n of
   the class's offered load O_R.
3. Saturation. Growing m grows the slice's adapters and load together; m_R = the largest m
   whose slice is feasible for one replica (not starved, throughput >= min_served_fraction x
   offered, at its best max_loras within memory; no utilisation margin), by bisection up to
   4n. The best single-replica throughput for the mix is C_R = h x O_R x m_R / n, h >= 1 the
   headroom left at m_R (bisection on a rate multiplier; the infeasible end of the bracket, so
   C_R is not under-estimated), and k_R = max(O_R / C_R, n / (m_R + 1)): a replica serves at
   most C_R tokens/s and holds at most m_R adapters of the mix.
4. Hot and cold. A plan may serve the hottest adapters on replicas of their own and the cold
   tail elsewhere, which can beat one representative mix; so for t = n/4, n/16, ... the top t
   adapters and the rest are also bounded as two classes (the top t at least t / (m_R + 1):
   hotter adapters never fit more per replica), and k_R is the smallest of these.
5. One replica. If the sum rounds up to 1, the only one-replica plan (every adapter on one
   replica at the largest rank) is checked directly; if it is infeasible the bound is 2.
6. Whole replicas by rank. The fractional sum lets a class's leftover fraction share a
   replica with any other class, but an adapter needs a replica of its slot rank or higher,
   and a rank-64 replica holds no more adapters than rank-64 replicas do, whatever their ranks.
   With M_R the most adapters one rank-R replica holds on any of its class's mixes (the largest
   infeasible slice found), for every rank R the replicas of rank >= R must hold the adapters of
   rank >= R (``nested_cover``).

Every slice is judged at every max_loras the per-replica optimum may choose: a coarser grid
assumed the predictor smooth in max_loras, which the surrogate is not (plans beat that bound).

Estimate = max(ceil(sum_R k_R), nested cover), at least 1. It is exact when the predictor's
capacity depends only on the load (tests/test_placement.py builds such cases) and the predictor
is right; a plan of very unlike replicas can beat it. Cost: about 25 predictor calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from placement.common import WorkloadIndex
from placement.context import PlacementContext
from placement.replica_optimum import (
    _config,
    candidates,
    check_rank_fits,
    is_feasible,
    max_feasible_scale,
)
from twin.config import EngineConfig, smallest_valid_rank
from twin.replica import ReplicaLoad
from twin.workload import Workload

SPLIT_RATIO = 4  # hot/cold splits tried: the top n/4, n/16, n/64, ... adapters of a class
SLICE_GROWTH = 4  # slices grow to SLICE_GROWTH x the class's adapters (its mix repeated)


@dataclass(frozen=True)
class ClassEstimate:
    """The bound's figures for one slot rank."""

    max_lora_rank: int
    n_adapters: int
    offered_tps: float
    adapters_per_replica: int  # m_R: the largest slice of the class one replica serves
    capacity_tps: float  # C_R: the best single-replica throughput for the class's mix
    replicas: float  # k_R (fractional)
    hot_split: int = 0  # k_R came from serving the top hot_split adapters apart (0: no split)


@dataclass(frozen=True)
class CapacityEstimate:
    replicas: int
    fractional: float
    offered_tps: float
    classes: tuple[ClassEstimate, ...]

    def class_for(self, max_lora_rank: int) -> ClassEstimate | None:
        return next((c for c in self.classes if c.max_lora_rank == max_lora_rank), None)


@dataclass(frozen=True, eq=False)
class _Segment:
    rank: int
    order: np.ndarray  # adapter positions, hottest first
    offered: float
    cap: int  # memory cap on max_loras at this rank


@dataclass(frozen=True)
class _SegmentBound:
    replicas: float  # fractional bound
    largest: int  # m: largest feasible slice (0: none)
    first_infeasible: int | None  # smallest infeasible slice size found (None: none up to 4n)
    capacity: float  # tokens/s of one replica on this mix


def estimate_capacity(
    workload: Workload, ctx: PlacementContext, *, index: WorkloadIndex | None = None
) -> CapacityEstimate:
    """The bound of the module docstring for ``workload`` under ``ctx``'s predictor."""

    index = index or WorkloadIndex(workload)
    offered = index.offered_tps
    slot = np.array([smallest_valid_rank(int(r)) for r in index.ranks])
    segments: list[_Segment] = []
    options: dict[int, list[tuple[int, int, int | None]]] = {}  # rank -> (t, top/whole, rest)
    for R in sorted(set(slot.tolist())):
        members = np.flatnonzero(slot == R)
        order = members[np.argsort(-index.rates[members], kind="stable")]
        cap = check_rank_fits(ctx, int(R))
        opts: list[tuple[int, int, int | None]] = []
        for t in [0, *_splits(len(order))]:
            parts = [order] if t == 0 else [order[:t], order[t:]]
            ids = []
            for part in parts:
                segments.append(_Segment(int(R), part, float(offered[part].sum()), cap))
                ids.append(len(segments) - 1)
            opts.append((t, ids[0], ids[1] if t else None))
        options[int(R)] = opts

    bounds = _segment_bounds(segments, index, offered, ctx)
    out = []
    per_replica: dict[int, float] = {}  # slot rank -> most adapters one replica holds
    for R, opts in options.items():
        whole = bounds[opts[0][1]]
        best_k, best_t = whole.replicas, 0
        for t, top, rest in opts[1:]:
            k_top = bounds[top].replicas
            if whole.first_infeasible is not None:
                k_top = max(k_top, t / whole.first_infeasible)
            k = k_top + bounds[rest].replicas
            if k < best_k - 1e-9:
                best_k, best_t = k, t
        seg = segments[opts[0][1]]
        out.append(ClassEstimate(R, len(seg.order), seg.offered, whole.largest, whole.capacity,
                              best_k, best_t))
        # the most adapters one replica of this slot rank takes on any of the class's mixes
        # (whole, hot parts, cold parts), for the nested cover below
        per_replica[R] = _most_per_replica(
            [(bounds[i].first_infeasible, len(segments[i].order))
             for o in opts for i in o[1:] if i is not None]
        )
    total = sum(c.replicas for c in out)
    replicas = max(1, math.ceil(total - 1e-9)) if math.isfinite(total) else 10**9
    replicas = max(replicas, nested_cover(
        [(c.max_lora_rank, c.n_adapters, per_replica[c.max_lora_rank]) for c in out]
    ))
    if replicas == 1 and not _one_replica_serves_all(index, ctx):
        replicas, total = 2, max(total, 1.0 + 1e-9)
    return CapacityEstimate(
        replicas=replicas, fractional=total, offered_tps=float(offered.sum()), classes=tuple(out)
    )


def _most_per_replica(found: list[tuple[int | None, int]]) -> float:
    """The most adapters one replica of a slot rank holds, from its class's segments
    ``(smallest infeasible slice or None, segment size)``: the largest infeasible slice found
    (a replica of any of the class's mixes holds fewer), or unbounded if a segment showed no
    limit as far as it was probed (``SLICE_GROWTH`` x its size) beyond that."""
    limits = [f for f, _ in found if f is not None]
    most = max(limits, default=0)
    if not limits or any(f is None and SLICE_GROWTH * n + 1 > most for f, n in found):
        return math.inf
    return float(most)


def nested_cover(classes: list[tuple[int, int, float]], slack: int = 2) -> int:
    """Fewest replicas, in whole numbers, for classes ``(slot rank, adapters, most adapters
    one replica of that rank holds)``: an adapter needs a replica of its slot rank or higher,
    so for every rank R the replicas of rank >= R must hold all adapters of rank >= R.

    The fractional sum over classes lets a class's leftover fraction share a replica with any
    other class; but a rank-64 replica's slots are rank-64 sized whatever it holds, so it holds
    at most what rank-64 replicas hold (uniform-1,000 with the surrogate: 65 adapters against
    a rank-8 replica's 164; 9 replicas by the sum, 10 here). It assumes a replica holds no more
    adapters of a lower rank's mix than of its own class's. Highest rank first, each rank takes
    the fewest replicas its suffix needs, or up to ``slack`` more: the minimum over those
    (slack + 1)^classes combinations.
    """
    ranks = sorted(classes, key=lambda c: -c[0])

    def best(j: int, held: float, need: float) -> float:
        if j == len(ranks):
            return 0
        _, n, per = ranks[j]
        need += n
        least = 0 if held >= need else max(1, math.ceil((need - held) / per - 1e-9))
        return min(x + best(j + 1, held + (x * per if x else 0.0), need)
                   for x in range(least, least + slack + 1))

    return int(best(0, 0.0, 0.0))


def _one_replica_serves_all(index: WorkloadIndex, ctx: PlacementContext) -> bool:
    """Whether one replica (all adapters, at the largest slot rank) is feasible for the whole
    workload: the only one-replica plan there is, so if it is not, the fleet needs two."""
    load = index.load(np.arange(len(index.ids)), np.ones(len(index.ids)))
    rank = smallest_valid_rank(load.max_rank)
    cap = check_rank_fits(ctx, rank)
    cfgs = [_config(ctx, g, load.n_adapters, rank) for g in candidates(ctx, load.n_adapters, cap)]
    preds = ctx.predictor.predict([load] * len(cfgs), cfgs)
    return any(is_feasible(p, ctx) for p in preds)


def _splits(n: int) -> list[int]:
    out, t = [], n // SPLIT_RATIO
    while t >= 1:
        out.append(t)
        t //= SPLIT_RATIO
    return out


def _segment_bounds(
    segments: list[_Segment], index: WorkloadIndex, offered: np.ndarray, ctx: PlacementContext
) -> list[_SegmentBound]:
    """Bisection on the slice size of every segment at once (one predictor call per step),
    then one batched headroom search at each segment's largest feasible slice."""

    def slice_load(sg: _Segment, m: int) -> ReplicaLoad:
        n = len(sg.order)
        k = np.arange(m)
        pick = sg.order[((k + 0.5) * n / m).astype(np.int64) % n]
        picked = float(offered[pick].sum())
        if picked > 0:
            rates = index.rates[pick] * (sg.offered * m / n / picked)
        else:  # only idle adapters picked: spread the segment's load evenly over the slice
            lengths = index.workload.lengths
            per_request = lengths.mean_prompt() + lengths.mean_output()
            rates = np.full(m, sg.offered / n / per_request)
        ids = tuple(index.ids[p] if m <= n else f"{index.ids[p]}~{j}"
                    for p, j in zip(pick.tolist(), k.tolist(), strict=True))
        return ReplicaLoad(ids, index.ranks[pick], rates, index.workload.lengths)

    def pairs(probes: dict[int, int]) -> tuple[list[ReplicaLoad], list[EngineConfig], list[int]]:
        loads, cfgs, owner = [], [], []
        for k, m in probes.items():
            sg = segments[k]
            load = slice_load(sg, m)
            # every max_loras the per-replica optimum may choose: a coarser grid assumed the
            # predictor smooth in max_loras, and the surrogate is not (on uniform-5000 plans
            # held 150 rank-8 adapters at 96 slots where the grid's 64 / 128 allowed 141)
            for g in candidates(ctx, m, sg.cap):
                loads.append(load)
                cfgs.append(_config(ctx, g, m, sg.rank))
                owner.append(k)
        return loads, cfgs, owner

    live = [k for k, sg in enumerate(segments) if sg.offered > 0]
    top = {k: SLICE_GROWTH * len(segments[k].order) for k in live}
    lo = dict.fromkeys(live, 0)  # largest feasible m found
    hi = {k: top[k] + 1 for k in live}  # smallest infeasible m found (top + 1: none)
    probe = {k: len(segments[k].order) for k in live}
    while probe:
        loads, cfgs, owner = pairs(probe)
        ok = dict.fromkeys(probe, False)
        for k, pred in zip(owner, ctx.predictor.predict(loads, cfgs), strict=True):
            ok[k] = ok[k] or is_feasible(pred, ctx)
        for k, m in probe.items():
            if ok[k]:
                lo[k] = m
            else:
                hi[k] = m
        probe = {}
        for k in live:
            if hi[k] - lo[k] <= 1:
                continue
            if lo[k] == 0:
                probe[k] = 1 if hi[k] > 1 else 0
            elif hi[k] > top[k]:
                probe[k] = min(top[k], 2 * lo[k])
            else:
                probe[k] = (lo[k] + hi[k]) // 2
            if probe[k] in (0, lo[k], hi[k]):
                del probe[k]

    # headroom at each segment's largest feasible slice (the single-adapter one if none is)
    at = {k: max(lo[k], 1) for k in live}
    loads, cfgs, owner = pairs(at)
    headroom = dict.fromkeys(live, 0.0)
    for k, h in zip(owner, max_feasible_scale(loads, cfgs, ctx, upper=True), strict=True):
        headroom[k] = max(headroom[k], float(h))

    out = []
    for k, sg in enumerate(segments):
        n = len(sg.order)
        if k not in at:
            out.append(_SegmentBound(0.0, n, None, 0.0))
            continue
        m = at[k]
        capacity = headroom[k] * sg.offered * m / n
        replicas = sg.offered / capacity if capacity > 0 else math.inf
        first_bad = hi[k] if hi[k] <= top[k] else None
        if lo[k] >= 1 and first_bad is not None:
            replicas = max(replicas, n / first_bad)
        out.append(_SegmentBound(replicas, lo[k], first_bad, capacity))
    return out
