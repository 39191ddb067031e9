"""What every placement policy needs, so that no policy re-implements it.

A policy decides *which traffic goes where*: a list of ``ReplicaSpec`` (for each replica group,
the share of each adapter's traffic one replica gets, and how many identical copies). Everything
else is here:

* ``WorkloadIndex``: the workload as arrays, to build replica loads fast;
* ``check_servable``: fail early, naming the adapter, when a rank fits no engine config;
* ``lpt_assign``: balanced assignment of items to k bins (largest first, to the lightest bin);
* ``size_replicas``: the smallest replica count at which a policy's assignment has no infeasible
  replica (binary search, one batched predictor call per probe);
* ``build_plan``: specs -> Plan: per-replica optimum (max_loras, max_cpu_loras, headroom),
  predicted metrics, routing table (weights = share x copies), lower bound, provenance.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.lower_bound import compute_lower_bound
from placement.plan import (
    PlacedAdapter,
    Plan,
    ProfileRef,
    ReplicaGroup,
    Route,
    WorkloadRef,
    normalise_metrics,
)
from placement.replica_optimum import ReplicaOptimum, check_rank_fits, loads_feasible, optimise
from twin.config import ConfigError, smallest_valid_rank
from twin.profile import InfeasibleConfigError
from twin.replica import ReplicaLoad
from twin.workload import Workload

SHARE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica group as a policy decides it.

    ``shares[id]``: the fraction of adapter ``id``'s total traffic that ONE replica of the group
    receives (so the group serves ``shares[id] x copies`` of it). ``max_loras``: pin the slots
    (None: the per-replica optimum chooses). ``name``: optional group name.
    """

    shares: Mapping[str, float]
    copies: int = 1
    max_loras: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.shares:
            raise PlacementError("ReplicaSpec.shares: a replica needs at least one adapter")
        if not isinstance(self.copies, int) or self.copies < 1:
            raise PlacementError(f"ReplicaSpec.copies: must be an integer >= 1, got {self.copies}")
        bad = [a for a, s in self.shares.items() if not (0.0 < s <= 1.0 + SHARE_TOLERANCE)]
        if bad:
            raise PlacementError(f"ReplicaSpec.shares: must be within (0, 1], bad for {bad[:3]}")


@dataclass(frozen=True, eq=False)
class WorkloadIndex:
    """The workload's adapters as arrays (ids, ranks, rates, offered tokens/s) with id lookup."""

    workload: Workload
    ids: tuple[str, ...] = field(init=False)
    ranks: np.ndarray = field(init=False)
    rates: np.ndarray = field(init=False)
    position: dict[str, int] = field(init=False)
    tokens_per_request: float = field(init=False)

    def __post_init__(self) -> None:
        w = self.workload
        object.__setattr__(self, "ids", tuple(a.id for a in w.adapters))
        object.__setattr__(self, "ranks", np.array([a.rank for a in w.adapters], dtype=np.int64))
        object.__setattr__(self, "rates", w.adapter_rates)
        object.__setattr__(self, "position", {a: i for i, a in enumerate(self.ids)})
        object.__setattr__(
            self, "tokens_per_request", w.lengths.mean_prompt() + w.lengths.mean_output()
        )

    @property
    def offered_tps(self) -> np.ndarray:
        """Offered tokens/s per adapter."""
        return self.rates * self.tokens_per_request

    def load(self, positions: Sequence[int] | np.ndarray, shares: Sequence[float] | np.ndarray
             ) -> ReplicaLoad:
        """The replica receiving ``shares[k]`` of adapter ``positions[k]``'s traffic."""
        pos = np.asarray(positions, dtype=np.int64)
        ids = self.ids
        return ReplicaLoad(
            adapter_ids=tuple([ids[i] for i in pos.tolist()]),
            ranks=self.ranks[pos],
            rates_rps=self.rates[pos] * np.asarray(shares, dtype=np.float64),
            lengths=self.workload.lengths,
        )

    def load_of(self, spec: ReplicaSpec) -> ReplicaLoad:
        try:
            pos = [self.position[a] for a in spec.shares]
        except KeyError as exc:
            raise PlacementError(f"ReplicaSpec.shares: unknown adapter {exc.args[0]!r}") from None
        return self.load(pos, list(spec.shares.values()))


# ---------------------------------------------------------------------------------------------
# early checks
# ---------------------------------------------------------------------------------------------


def check_servable(workload: Workload, ctx: PlacementContext) -> None:
    """Every adapter's rank fits some engine config on this GPU; otherwise say which and why."""
    if not workload.adapters:
        raise PlacementError(f"workload {workload.name!r}: no adapters to place")
    if workload.base_model_rate_rps > 0:
        raise PlacementError(
            f"workload {workload.name!r}: base_model_rate_rps={workload.base_model_rate_rps:g}; "
            "placing base-model traffic is not supported yet (set it to 0)"
        )
    by_rank: dict[int, str] = {}
    for a in workload.adapters:
        by_rank.setdefault(a.rank, a.id)
    for rank, adapter in sorted(by_rank.items()):
        try:
            slot = smallest_valid_rank(rank)
            check_rank_fits(ctx, slot)
        except ConfigError as exc:
            raise PlacementError(
                f"adapter {adapter!r} (rank {rank}) fits no engine config: {exc}"
            ) from None
        except InfeasibleConfigError as exc:
            raise PlacementError(
                f"adapter {adapter!r} (rank {rank}) fits no engine config on "
                f"{ctx.profile.name}: even max_loras=1 at max_lora_rank={slot} is infeasible. {exc}"
            ) from None


# ---------------------------------------------------------------------------------------------
# assignment and sizing
# ---------------------------------------------------------------------------------------------


def lpt_assign(sizes: Sequence[float] | np.ndarray, k: int,
               initial: Sequence[float] | None = None) -> np.ndarray:
    """Bin (0..k-1) of each item: largest first, each to the currently lightest bin.

    Balances load across k bins within 4/3 of optimal (Graham's LPT); O(n log k).
    ``initial``: loads the bins already carry.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    order = np.argsort(-sizes, kind="stable")
    ranked = sizes[order].tolist()
    assigned = [0] * len(ranked)
    start = 0
    if initial is None:
        # all bins start empty, so the heap would hand the m = min(k, n) largest items bins
        # 0..m-1 in turn (each then weighs more than the empty ones) if they are all > 0:
        # done directly, which is most of the work when k is near n
        start = min(k, len(ranked))
        if start and not ranked[start - 1] > 0:
            start = 0
        assigned[:start] = range(start)
        heap = [(s, b) for b, s in enumerate(ranked[:start])]
        heap += [(0.0, b) for b in range(start, k)]
    else:
        heap = [(float(initial[b]), b) for b in range(k)]
    heapq.heapify(heap)
    for pos in range(start, len(ranked)):
        load, b = heap[0]
        assigned[pos] = b
        heapq.heapreplace(heap, (load + ranked[pos], b))
    out = np.empty(len(ranked), dtype=np.int64)
    out[order] = assigned
    return out


def lpt_assign_counted(sizes: Sequence[float] | np.ndarray, k: int, size_cap: float,
                       count_cap: float) -> np.ndarray:
    """Bin (0..k-1) of each item: largest first, each to the least *filled* bin, its fill the
    larger of its load / ``size_cap`` and its item count / ``count_cap``.

    A replica is limited by the tokens it serves and by the adapters sharing its LoRA slots: a
    hot adapter alone can fill half a replica's tokens while a hundred cold ones fill its slots
    with few tokens. Plain LPT balances tokens only, so it piles every cold adapter into the bin
    the hot ones left lightest; this balances both (vector LPT, O(n log k)).
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    if not (size_cap > 0 and count_cap > 0):
        raise ValueError("lpt_assign_counted: size_cap and count_cap must be > 0")
    order = np.argsort(-sizes, kind="stable")
    assigned = np.empty(len(sizes), dtype=np.int64)
    heap = [(0.0, 0.0, b) for b in range(k)]  # (fill, load, bin): ties to the lighter bin
    loads = [0.0] * k
    counts = [0] * k
    for pos, size in zip(order.tolist(), sizes[order].tolist(), strict=True):
        _, _, b = heap[0]
        assigned[pos] = b
        loads[b] += size
        counts[b] += 1
        fill = max(loads[b] / size_cap, counts[b] / count_cap)
        heapq.heapreplace(heap, (fill, loads[b], b))
    return assigned


def specs_feasible(
    specs: Sequence[ReplicaSpec], index: WorkloadIndex, ctx: PlacementContext
) -> list[bool]:
    """Whether each replica has a feasible max_loras (one batched predictor call)."""
    loads = [index.load_of(s) for s in specs]
    return loads_feasible(loads, ctx, max_loras=[s.max_loras for s in specs])


def size_replicas(
    assign: Callable[[int], list[ReplicaSpec]],
    index: WorkloadIndex,
    ctx: PlacementContext,
    lo: int = 1,
    hi: int | None = None,
) -> tuple[int, list[ReplicaSpec]]:
    """Smallest k in [lo, hi] whose ``assign(k)`` has no infeasible replica.

    ``assign(k)`` returns the specs of a k-replica placement. Doubles from ``lo`` until feasible
    (hi defaults to one replica per adapter, or 4x more when adapters must be split), then
    bisects; if even ``hi`` is infeasible returns hi's specs (the caller reports the starved).
    """
    lo = max(1, lo)
    cap = hi if hi is not None else max(lo, 4 * len(index.ids))
    cache: dict[int, tuple[bool, list[ReplicaSpec]]] = {}

    def probe(k: int) -> bool:
        if k not in cache:
            specs = assign(k)
            cache[k] = (all(specs_feasible(specs, index, ctx)), specs)
        return cache[k][0]

    k = smallest_feasible(probe, lo, cap, lambda k: max(k + 1, 2 * k))
    assert k is not None  # no give_up: the search always ends on a count
    return k, cache[k][1]


def smallest_feasible(
    probe: Callable[[int], bool], lo: int, hi: int, next_k: Callable[[int], int],
    give_up: Callable[[int], bool] = lambda _lo: False, floor: int | None = None,
) -> int | None:
    """Smallest k in [lo, hi] with ``probe(k)``, for a probe that stays true once true.

    Gallops up from ``lo`` (``next_k`` says how far) until a probe holds, then bisects between
    the last failure and it. Returns ``hi`` when even ``hi`` fails (the caller reports what is
    infeasible), None as soon as ``give_up(lo)`` says no answer from ``lo`` up can pay.
    With ``floor``, ``lo`` is only where the search starts (an estimate): if it already holds,
    the search gallops down towards ``floor`` instead, so a start set too high by a wrong
    estimate cannot inflate the answer.
    """
    if give_up(lo):
        return None
    if floor is not None and lo > floor and probe(lo):
        good, step = lo, 1
        while good > floor:
            below = max(floor, good - step)
            if not probe(below):
                return _bisect(probe, below + 1, good)
            good, step = below, 2 * step
        return good
    k = lo
    while not probe(k):
        if k >= hi:
            return k
        lo = k + 1
        if give_up(lo):
            return None
        k = min(hi, next_k(k))
    return _bisect(probe, lo, k)


def _bisect(probe: Callable[[int], bool], lo: int, good: int) -> int:
    """Smallest k in [lo, good] with ``probe(k)``, knowing ``probe(good)``."""
    while lo < good:
        mid = (lo + good) // 2
        if probe(mid):
            good = mid
        else:
            lo = mid + 1
    return good


# ---------------------------------------------------------------------------------------------
# specs -> plan
# ---------------------------------------------------------------------------------------------


def group_names(specs: Sequence[ReplicaSpec]) -> list[str]:
    """Spec names, or ``group-000``... for unnamed ones (unique)."""
    width = max(3, len(str(len(specs) - 1)))
    names = [s.name or f"group-{i:0{width}d}" for i, s in enumerate(specs)]
    if len(set(names)) != len(names):
        raise PlacementError("ReplicaSpec.name: group names must be unique")
    return names


def routing_table(
    specs: Sequence[ReplicaSpec], names: Sequence[str], index: WorkloadIndex
) -> dict[str, tuple[Route, ...]]:
    """adapter -> [(group, share x copies)], checked to cover every adapter exactly once."""
    routes: dict[str, list[Route]] = {a: [] for a in index.ids}
    for spec, name in zip(specs, names, strict=True):
        for a, s in spec.shares.items():
            if a not in routes:
                raise PlacementError(f"ReplicaSpec.shares: unknown adapter {a!r}")
            routes[a].append(Route(group=name, weight=float(s) * spec.copies))
    for a, rs in routes.items():
        total = sum(r.weight for r in rs)
        if not rs or abs(total - 1.0) > SHARE_TOLERANCE:
            raise PlacementError(
                f"placement of adapter {a!r}: its traffic shares x copies sum to {total:.9g}, "
                "not 1 (every adapter must be served exactly once)"
            )
    return {a: tuple(rs) for a, rs in routes.items()}


def build_plan(
    workload: Workload,
    ctx: PlacementContext,
    policy: str,
    specs: Sequence[ReplicaSpec],
    *,
    index: WorkloadIndex | None = None,
    optima: Sequence[ReplicaOptimum] | None = None,
    started: float | None = None,
) -> Plan:
    """Turn a policy's specs into a validated Plan.

    Runs the per-replica optimum (batched, with headroom) unless ``optima`` are given; the lower
    bound is ``ctx.lower_bound`` when the planner computed it, else computed here. ``started``
    (a ``time.perf_counter()`` value) records the planning wall time.
    """
    index = index or WorkloadIndex(workload)
    names = group_names(specs)
    routing = routing_table(specs, names, index)
    loads = [index.load_of(s) for s in specs]
    if optima is None:
        optima = optimise(loads, ctx, headroom=True, max_loras=[s.max_loras for s in specs])
    groups = []
    for spec, name, load, opt in zip(specs, names, loads, optima, strict=True):
        groups.append(
            ReplicaGroup(
                name=name,
                adapters=tuple(
                    PlacedAdapter(a, int(r), float(q))
                    for a, r, q in zip(load.adapter_ids, load.ranks, load.rates_rps, strict=True)
                ),
                engine=opt.engine,
                copies=spec.copies,
                predicted=normalise_metrics(opt.predicted),
                headroom=None if opt.headroom is None else float(opt.headroom),
            )
        )
    bound = ctx.lower_bound or compute_lower_bound(workload, ctx)
    return Plan(
        policy=policy,
        predictor=ctx.predictor_name,
        profile=ProfileRef.of(ctx.profile),
        workload=WorkloadRef(
            name=workload.name,
            n_adapters=len(workload.adapters),
            total_rate_rps=workload.total_rate_rps,
            offered_total_tps=workload.offered_tokens_per_s(),
            lengths=workload.lengths.to_dict(),
        ),
        groups=tuple(groups),
        routing=routing,
        lower_bound_replicas=bound.replicas,
        plan_wall_s=None if started is None else round(time.perf_counter() - started, 4),
        settings={
            "min_served_fraction": ctx.min_served_fraction,
            "target_utilisation": ctx.target_utilisation,
            "max_num_seqs": ctx.max_num_seqs,
            "max_num_batched_tokens": ctx.max_num_batched_tokens,
        },
    )
