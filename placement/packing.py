"""The ``lorafleet`` policy: rank-aware bin packing that minimises replicas with no starved one.

Steps (docs/placement.md#packing), each a few batched predictor calls:

1. Hot adapters. The capacity of a replica serving one adapter alone (per slot rank, at
   max_loras=1) is found by bisection. An adapter offering more gets floor(load / capacity)
   dedicated replicas (one group, ``copies`` of them, each at capacity) and its remainder joins
   the packing as a fragment; its routing weights are proportional to the capacity each replica
   gives it.
2. Rank-aware packing, highest slot rank first. Each rank class is packed on its own replicas
   (so one rank-64 adapter never turns a replica of rank-8 adapters into a rank-64 one) by a
   binary search on the replica count k, starting at the lower bound: the class's items (largest
   first) go to the lightest of k bins by tokens (LPT) or, if that dealing has an infeasible
   bin, to the least filled, its fill the larger of its tokens / the class's single-replica
   capacity and its adapters / the adapters one replica holds (both from the lower bound); k is
   feasible when every bin has a feasible max_loras (batched predictor calls over the bins not
   judged before, stopping at the first infeasible one). Before a lower class opens its own
   replicas, it fills the spare capacity (headroom) the higher-rank replicas already have: the
   only mixing of ranks, and only where it saves capacity that would be wasted.
3. The same packing with every adapter in one class (at the largest rank) is also tried; the
   plan with fewer replicas wins (ties: the rank-aware one). Its search stops as soon as it
   cannot end with fewer.
4. Reduction: replicas are emptied into the others' spare capacity, lightest first, in fill
   rounds: what a replica refused (its headroom, measured on its old mix, over-estimated what
   many new adapters leave) is offered to the replicas that took all of theirs.
5. Repair: any replica still infeasible at the end (a noisy predictor) is split in two.
6. Margin: with the replica count fixed, the packing is redone at tighter target utilisations
   (bisection between 60 % and 100 % of the requested one, three packings) and the tightest that
   needs no more replicas is kept, so the minimal fleet keeps the widest margin it can (packing
   to the edge can leave a replica saturated, with TTFTs of minutes, where an even spread of
   the same replicas has headroom on all of them). A trial packing stops as soon as it is sure
   to need more replicas.
"""

from __future__ import annotations

import heapq
import re
import time
from dataclasses import dataclass, field, replace

import numpy as np

from placement.capacity_estimate import CapacityEstimate, estimate_capacity
from placement.common import (
    ReplicaSpec,
    WorkloadIndex,
    build_plan,
    check_servable,
    lpt_assign,
    lpt_assign_counted,
    smallest_feasible,
)
from placement.context import PlacementContext
from placement.plan import Plan
from placement.replica_optimum import (
    ReplicaOptimum,
    _config,
    check_rank_fits,
    loads_feasible,
    max_feasible_scale,
    optimise,
)
from twin.config import smallest_valid_rank
from twin.replica import ReplicaLoad
from twin.workload import Workload

MAX_REDUCTIONS = 4
# once the replica count is minimal, pack again at tighter fractions of the target utilisation
# (bisection in [MARGIN_FLOOR, 1], MARGIN_STEPS packings) and keep the tightest that needs no
# more replicas: the same fleet with its load spread evenly
MARGIN_FLOOR = 0.6
MARGIN_STEPS = 3
MAX_REPAIRS = 4
# reduction's fill rounds: a round's headroom estimate is for each bin's old mix, so a bin given
# many new adapters keeps only a prefix; the next round offers the rest to the bins that took
# all theirs (only in the reduction, whose outcome is all or nothing: in the class packing,
# more rounds change what the later classes find and gave 47 instead of 46 replicas on the
# surrogate's uniform-5000)
MAX_FILL_ROUNDS = 6
# a probe of the search on k judges its new bins in chunks of doubling size, from 1/PROBE_CHUNKS
# of them (at least PROBE_CHUNK_MIN), and stops at the first infeasible one
PROBE_CHUNKS = 16
PROBE_CHUNK_MIN = 16


@dataclass
class _Items:
    """What is packed: (adapter position, share of its traffic, offered tokens/s, slot rank)."""

    pos: np.ndarray
    share: np.ndarray
    size: np.ndarray
    rank: np.ndarray


@dataclass
class _Bin:
    rank: int
    items: list[int] = field(default_factory=list)
    size: float = 0.0
    headroom: float | None = None  # None: unknown (bin changed since last measured)


@dataclass(frozen=True)
class LorafleetPolicy:
    """Rank-aware, starvation-free bin packing minimising replicas (module docstring)."""

    name: str = "lorafleet"

    def place(self, workload: Workload, ctx: PlacementContext) -> Plan:
        started = time.perf_counter()
        check_servable(workload, ctx)
        index = WorkloadIndex(workload)
        bound = ctx.estimate or estimate_capacity(workload, ctx, index=index)
        ctx = replace(ctx, estimate=bound)
        packed = _pack(index, ctx, bound)
        assert packed is not None  # only a limited packing gives up
        specs, optima = packed
        count = _replicas(specs)
        # fewest replicas first; then the widest margin that still needs no more of them
        # (bisection on a factor of the target utilisation, down to MARGIN_FLOOR)
        ok, bad = 1.0, MARGIN_FLOOR
        base = ctx
        for _ in range(MARGIN_STEPS):
            factor = (ok + bad) / 2.0
            tighter = replace(base, target_utilisation=round(base.target_utilisation * factor, 4))
            if tighter.target_utilisation * _reach(optima) >= 1.0:
                ok, ctx = factor, tighter  # the plan in hand already keeps this margin
                continue
            trial = _pack(index, tighter, bound, within=count)
            if (trial is not None and _replicas(trial[0]) <= count
                    and all(o.feasible for o in trial[1])):
                ok, ctx, (specs, optima) = factor, tighter, trial
            else:
                bad = factor
        return build_plan(workload, ctx, self.name, specs, index=index, optima=optima,
                          started=started)


def _hot_name(adapter: str, k: int) -> str:
    """``hot-<adapter id>`` made a valid group name (ids may hold '/', spaces...)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", adapter).strip("-.")[:48]
    return f"hot-{clean}" if clean == adapter else f"hot{k}-{clean or 'adapter'}"


def _reach(optima: list[ReplicaOptimum]) -> float:
    """The smallest headroom of a plan's replicas: it stays feasible at utilisation 1/reach."""
    return min((o.headroom if o.headroom is not None else 1.0) for o in optima)


def _replicas(specs: list[ReplicaSpec]) -> int:
    return sum(s.copies for s in specs)


def _pack(
    index: WorkloadIndex, ctx: PlacementContext, bound: CapacityEstimate,
    within: int | None = None
) -> tuple[list[ReplicaSpec], list[ReplicaOptimum]] | None:
    """One packing run (steps 1-5 of the module docstring) at ``ctx``'s margin.

    ``within``: only a plan of at most that many replicas is of use; None as soon as the
    packing is sure to need more (the margin trials, most of which need more, stop early).
    Reduction removes at most one bin per attempt and repair never removes one, so a packing
    of ``limit`` bins or more ends above ``within``; and the merged packing (step 3) is only
    of use with fewer bins than the rank-aware one. Both searches on k stop once their
    result is sure to reach such a limit, so the plan is the one the full runs would give.
    """
    packer = _Packer(index, ctx, bound)
    dedicated = packer.split_hot()
    limit = None if within is None else within - _replicas(dedicated) + MAX_REDUCTIONS + 1
    bins = packer.pack(by_rank=True, fewer_than=limit)
    if len(set(packer.items.rank.tolist())) > 1:
        useful = limit if bins is None else len(bins)
        merged = packer.pack(by_rank=False, fewer_than=useful)
        if merged is not None and (bins is None or len(merged) < len(bins)):
            bins = merged
    if bins is None:
        return None
    bins = packer.reduce(bins)
    bins, optima = packer.repair(bins)
    ded_optima = optimise(
        [index.load_of(s) for s in dedicated], ctx, max_loras=[1] * len(dedicated)
    )
    return dedicated + [packer.spec(b) for b in bins], ded_optima + optima


class _Packer:
    """Working state of one packing run (items and bins are plain mutable records here)."""

    def __init__(self, index: WorkloadIndex, ctx: PlacementContext,
                 bound: CapacityEstimate) -> None:
        self.index = index
        self.ctx = ctx
        self.bound = bound
        self.items = _Items(*(np.zeros(0, dtype=t) for t in (np.int64, float, float, np.int64)))
        # feasibility of a bin by its items (in order): the search on k and the fill bisection
        # judge the same bins again and again (near k = n most bins are the same single items)
        self._verdicts: dict[tuple[int, ...], bool] = {}
        # items' sizes and slot ranks as Python numbers: bins are built item by item, a few
        # hundred thousand times per plan on large workloads
        self._size_of: list[float] = []
        self._rank_of: list[int] = []

    # -- hot adapters -----------------------------------------------------------------------
    def split_hot(self) -> list[ReplicaSpec]:
        """Dedicated groups for adapters hotter than one replica; everything else (and the
        remainders) becomes ``self.items``."""
        idx, ctx = self.index, self.ctx
        size = idx.offered_tps
        slot = np.array([smallest_valid_rank(int(r)) for r in idx.ranks], dtype=np.int64)
        share = np.ones(len(size))
        # single-adapter capacity per slot rank, probed on the class's hottest adapter
        reps = {int(R): int(np.flatnonzero(slot == R)[np.argmax(size[slot == R])])
                for R in np.unique(slot)}
        for R in reps:
            check_rank_fits(ctx, R)
        loads = [idx.load([p], [1.0]) for p in reps.values()]
        scale = max_feasible_scale(loads, [_config(ctx, 1, 1, R) for R in reps], ctx)
        single = {R: float(s) * ld.offered_tokens_per_s() * ctx.target_utilisation
                  for R, s, ld in zip(reps, scale, loads, strict=True)}
        dedicated: list[ReplicaSpec] = []
        for p in np.flatnonzero(size > np.array([single[int(R)] for R in slot])):
            cap = single[int(slot[p])]
            if cap <= 0:
                continue  # not even a sliver is feasible: packing reports it starved
            copies = int(size[p] // cap)
            per_copy = cap / size[p]
            dedicated.append(ReplicaSpec({idx.ids[p]: per_copy}, copies=copies, max_loras=1,
                                         name=_hot_name(idx.ids[p], len(dedicated))))
            share[p] = 1.0 - copies * per_copy
        keep = share > 1e-9
        self._verdicts.clear()
        self.items = _Items(pos=np.flatnonzero(keep), share=share[keep],
                            size=(size * share)[keep], rank=slot[keep])
        self._size_of = self.items.size.tolist()
        self._rank_of = self.items.rank.tolist()
        return dedicated

    # -- packing ----------------------------------------------------------------------------
    def pack(self, *, by_rank: bool, fewer_than: int | None = None) -> list[_Bin] | None:
        """Rank classes from the highest down; each fills existing spare, then opens bins.
        None once the packing is sure to end with ``fewer_than`` bins or more."""
        items = self.items
        bins: list[_Bin] = []
        classes = sorted(set(items.rank.tolist()), reverse=True) if by_rank else [None]
        for R in classes:
            pool = np.arange(len(items.pos)) if R is None else np.flatnonzero(items.rank == R)
            left = pool.tolist()
            if bins:
                left, _ = self.fill(bins, left)
            if left:
                opened = self.pack_class(
                    np.array(left, dtype=np.int64),
                    fewer_than=None if fewer_than is None else fewer_than - len(bins),
                )
                if opened is None:
                    return None
                bins += opened
        return bins

    def pack_class(self, pool: np.ndarray, fewer_than: int | None = None) -> list[_Bin] | None:
        """Fewest LPT-balanced bins of ``pool`` with every bin feasible (search on k).

        None as soon as the result is sure to have ``fewer_than`` bins or more: with every
        item's size > 0, LPT fills all k <= n bins, and the search never settles below its
        current lower end ``lo``.
        """
        sizes = self.items.size[pool]
        exact_count = bool(np.all(sizes > 0))

        def hopeless(lo: int) -> bool:
            return fewer_than is not None and exact_count and lo >= fewer_than

        cls = self.bound.class_for(int(self.items.rank[pool].max()))
        cap = cls.capacity_tps if cls is not None else 0.0
        per_replica = cls.adapters_per_replica if cls is not None else 0
        hi = len(pool)
        # start below the class's bound: its capacity is for the class's mix, and a pool of
        # hotter adapters (fewer per replica) can beat it
        lo = min(hi, max(1, int(0.75 * sizes.sum() / cap)) if cap > 0 else 1)
        items = pool.tolist()
        tried: dict[int, tuple[bool, list[list[int]]]] = {}  # k -> (feasible, bins' items)

        def grouped(assignment: np.ndarray) -> list[list[int]]:
            groups: list[list[int]] = [[] for _ in range(int(assignment.max()) + 1)]
            for item, b in zip(items, assignment.tolist(), strict=True):
                groups[b].append(item)
            return [g for g in groups if g]

        def probe(k: int) -> bool:
            # two balanced dealings of the pool into k bins: by tokens alone (LPT), then by
            # tokens and adapters together (a replica holds at most about the class bound's
            # m_R adapters of its mix); k is feasible if either has every bin feasible
            if k not in tried:
                plain = grouped(lpt_assign(sizes, k))
                tried[k] = (self.all_feasible(plain), plain)
                if not tried[k][0] and cap > 0 and per_replica > 0:
                    counted = grouped(lpt_assign_counted(sizes, k, cap, per_replica))
                    if counted != plain:
                        tried[k] = (self.all_feasible(counted), counted)
            return tried[k][0]

        k = smallest_feasible(probe, lo, hi, lambda k: max(k + 1, int(k * 1.25) + 1),
                              give_up=hopeless, floor=1)
        # k == hi and infeasible: even one item per bin fails; repaired and reported downstream
        return None if k is None else [self._bin(g) for g in tried[k][1]]

    def fill(
        self, bins: list[_Bin], pool: list[int], *, allow_raise: bool = False
    ) -> tuple[list[int], list[_Bin]]:
        """Put pool items into the bins' spare capacity; returns the items left over and the
        bins that refused some of what they were given.

        A bin's spare is estimated from its headroom: largest item first, into the bin with the
        most spare among the lowest slot rank that holds it (keeps items on the cheapest
        replicas); ``allow_raise`` also lets an item into a lower-rank bin (raising its
        max_lora_rank) when nothing else has room. The headroom scales the bin's *current* mix,
        so it over-estimates when many new adapters join: the predictor checks every changed
        bin, and a rejected bin keeps the longest feasible prefix of what it was given (largest
        items first; bisection, all rejected bins in one predictor call per step).
        """
        items = self.items
        self.measure(bins)
        heaps: dict[int, list[tuple[float, int]]] = {}
        for j, b in enumerate(bins):
            if b.headroom is not None and b.headroom > 1.0 and b.size > 0:
                heaps.setdefault(b.rank, []).append((-(b.headroom - 1.0) * b.size, j))
        for h in heaps.values():
            heapq.heapify(h)
        ranks = sorted(heaps)
        added: dict[int, list[int]] = {}
        left = []
        for item in sorted(pool, key=lambda i: -items.size[i]):
            r, need = int(items.rank[item]), items.size[item]
            order = [q for q in ranks if q >= r]
            if allow_raise:
                order += [q for q in reversed(ranks) if q < r]
            home = next((q for q in order if heaps[q] and -heaps[q][0][0] >= need), None)
            if home is None:
                left.append(item)
                continue
            room, j = heapq.heappop(heaps[home])
            added.setdefault(j, []).append(item)
            heapq.heappush(heaps[home], (room + need, j))
        if not added:
            return left, []
        base = {j: list(bins[j].items) for j in added}
        # bisection on how many of its new items each bin keeps: lo feasible, hi not (yet)
        lo = dict.fromkeys(added, 0)
        hi = {j: len(v) for j, v in added.items()}
        probe = dict(hi)
        while probe:
            verdict = self.feasible([base[j] + added[j][:m] for j, m in probe.items()])
            for (j, m), good in zip(probe.items(), verdict, strict=True):
                if good:
                    lo[j] = m
                else:
                    hi[j] = m - 1
            probe = {j: (lo[j] + hi[j] + 1) // 2 for j in added if lo[j] < hi[j]}
        refused = []
        for j, new in added.items():
            keep = lo[j]
            for item in new[:keep]:
                self._add(bins[j], item)
            left += new[keep:]
            if keep < len(new):
                refused.append(bins[j])
        return left, refused

    def fill_rounds(self, bins: list[_Bin], pool: list[int], *,
                    allow_raise: bool = False) -> list[int]:
        """``fill`` again with what it left over, while a round still places something (at
        most ``MAX_FILL_ROUNDS``), offering the leftovers only to bins that took everything
        they were given: a bin that refused part of its share (its headroom, measured on its
        old mix, over-estimated what many new adapters leave) would attract them again."""
        left, open_bins = pool, list(bins)
        for _ in range(MAX_FILL_ROUNDS):
            before = len(left)
            left, refused = self.fill(open_bins, left, allow_raise=allow_raise)
            if not left or len(left) == before:
                break
            # a bin that refused items is full whatever its re-measured headroom says
            open_bins = [b for b in open_bins if not any(b is r for r in refused)]
        return left

    def reduce(self, bins: list[_Bin]) -> list[_Bin]:
        """Try to empty replicas (lightest first) into the others' spare capacity."""
        attempts = 0
        for victim in sorted(bins, key=lambda b: b.size):
            if attempts >= MAX_REDUCTIONS or len(bins) < 2:
                break
            attempts += 1
            rest = [b for b in bins if b is not victim]
            snapshot = [(list(b.items), b.size, b.rank, b.headroom) for b in rest]
            if self.fill_rounds(rest, list(victim.items), allow_raise=True):
                for b, (its, size, rank, head) in zip(rest, snapshot, strict=True):
                    b.items, b.size, b.rank, b.headroom = its, size, rank, head
                continue
            bins = rest
        return bins

    def repair(self, bins: list[_Bin]) -> tuple[list[_Bin], list[ReplicaOptimum]]:
        """Final per-replica optimum; split any infeasible multi-item bin in two and retry."""
        for _ in range(MAX_REPAIRS):
            optima = optimise([self.load(b.items) for b in bins], self.ctx, headroom=True)
            bad = {j for j, o in enumerate(optima) if not o.feasible and len(bins[j].items) > 1}
            if not bad:
                return bins, optima
            out = [b for j, b in enumerate(bins) if j not in bad]
            for j in sorted(bad):
                its = bins[j].items
                halves = [_Bin(rank=0), _Bin(rank=0)]
                for item, h in zip(its, lpt_assign(self.items.size[its], 2).tolist(), strict=True):
                    self._add(halves[h], item)
                out += [h for h in halves if h.items]
            bins = out
        return bins, optimise([self.load(b.items) for b in bins], self.ctx, headroom=True)

    # -- helpers ----------------------------------------------------------------------------
    def feasible(self, groups: list[list[int]]) -> list[bool]:
        """Whether each bin (given by its items) has a feasible max_loras: one predictor call
        for the bins not judged before (a bin's verdict depends only on its items, in order,
        the context being fixed; searches judge the same bins again and again, and near k = n
        most bins are the same single items)."""
        keys = [tuple(g) for g in groups]
        todo = {k: g for k, g in zip(keys, groups, strict=True) if k not in self._verdicts}
        if todo:
            verdicts = loads_feasible([self.load(g) for g in todo.values()], self.ctx)
            self._verdicts.update(zip(todo, verdicts, strict=True))
        return [self._verdicts[k] for k in keys]

    def all_feasible(self, groups: list[list[int]]) -> bool:
        """Whether every bin is feasible, judging as few bins as it takes: none when one is
        known not to be, else the unjudged ones in chunks of doubling size (the first
        ``1 / PROBE_CHUNKS`` of them, at least ``PROBE_CHUNK_MIN``), stopping at the first
        infeasible bin. A search on k mostly probes infeasible k, settled by an early chunk."""
        todo = []
        for g in groups:
            verdict = self._verdicts.get(tuple(g))
            if verdict is False:
                return False
            if verdict is None:
                todo.append(g)
        start, size = 0, max(PROBE_CHUNK_MIN, len(todo) // PROBE_CHUNKS)
        while start < len(todo):
            if not all(self.feasible(todo[start : start + size])):
                return False
            start, size = start + size, 2 * size
        return True

    def measure(self, bins: list[_Bin]) -> None:
        """Headroom of every bin whose headroom is unknown (one batched search)."""
        todo = [b for b in bins if b.headroom is None]
        if todo:
            optima = optimise([self.load(b.items) for b in todo], self.ctx)
            for b, o in zip(todo, optima, strict=True):
                b.headroom = o.headroom if o.feasible and o.headroom is not None else 0.0

    def load(self, items: list[int]) -> ReplicaLoad:
        """The replica serving these items."""
        return self.index.load(self.items.pos[items], self.items.share[items])

    def spec(self, b: _Bin) -> ReplicaSpec:
        ids, items = self.index.ids, self.items
        return ReplicaSpec({ids[items.pos[i]]: float(items.share[i]) for i in b.items})

    def _bin(self, its: list[int]) -> _Bin:
        b = _Bin(rank=0)
        for item in its:
            self._add(b, item)
        return b

    def _add(self, b: _Bin, item: int) -> None:
        b.items.append(item)
        b.size += self._size_of[item]
        rank = self._rank_of[item]
        if rank > b.rank:
            b.rank = rank
        b.headroom = None

    def _remove(self, b: _Bin, item: int) -> None:
        b.items.remove(item)
        b.size -= float(self.items.size[item])
        b.rank = max((int(self.items.rank[i]) for i in b.items), default=0)
        b.headroom = None
