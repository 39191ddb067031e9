"""The single-replica problem: for the traffic one replica gets, which max_loras (and
max_cpu_loras) serves it best within memory, and how much more load it could take.

Everything here is batched: a policy hands in all its replicas at once and each step of a search
is ONE predictor call over every (replica, candidate) pair, so a microsecond surrogate is not
drowned in Python overhead and a slow twin predictor is called as rarely as possible. (A bare
feasibility verdict, ``loads_feasible``, takes up to three calls: the candidates most often
feasible first, the others only for the replicas still undecided.)

Rules (also in docs/placement.md):

* feasible = the predictor says "not starved" and throughput >= ``min_served_fraction`` x offered
  (judged at load / ``target_utilisation``, the optional margin);
* max_loras candidates: the context's grid, capped by the replica's adapter count (more slots
  than adapters only cost step time) and by memory: the largest max_loras whose KV cache still
  holds one max_model_len request at this max_lora_rank (the profile's "What fits" rule);
* at a load below capacity every non-starved max_loras completes the same tokens, so "the
  max_loras that maximises throughput" is the one whose throughput goes furthest before the
  replica becomes infeasible: the largest headroom; ties (within twice the search tolerance) go
  to the smaller max_loras (less memory, fewer slot costs);
* max_cpu_loras = the replica's adapter count (all registered and CPU-resident at start, as
  servers that register adapters at start run; the profile has no CPU-memory limit to apply);
* headroom = the largest multiplier of the replica's rates that stays feasible (bisection in log
  space to ``headroom_tolerance``, capped at ``MAX_SCALE``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from placement.context import PlacementContext
from placement.errors import PlacementError
from twin.config import ConfigError, EngineConfig, smallest_valid_rank
from twin.profile import InfeasibleConfigError
from twin.replica import ReplicaLoad, predict_columns

MAX_SCALE = 1024.0
MIN_SCALE = 1.0 / 1024.0
_ESTIMATES = 3  # capacity-estimate jumps per search, then plain bisection
# candidates ``loads_feasible`` judges per load in its first stages (largest max_loras first)
# before all the rest: on packing searches most feasible loads are feasible at the first. Only
# batches of at least _STAGED_FROM pairs are staged: on small ones the predictor's cost per
# call (milliseconds for the analytic one) outweighs the predictions saved.
_FEASIBLE_STAGES = (1, 1)
_STAGED_FROM = 256


@dataclass(frozen=True)
class ReplicaOptimum:
    """The chosen engine config for one replica's load and what the predictor says of it."""

    engine: EngineConfig
    predicted: dict[str, Any]  # at the replica's actual load
    feasible: bool
    headroom: float | None = None  # multiplier of the actual load; None when not searched


# ---------------------------------------------------------------------------------------------
# memory and candidates
# ---------------------------------------------------------------------------------------------


def slot_rank(load: ReplicaLoad) -> int:
    """The smallest max_lora_rank vLLM accepts that holds every adapter of the load."""
    try:
        return smallest_valid_rank(load.max_rank)
    except ConfigError as exc:
        worst = load.adapter_ids[int(np.argmax(load.ranks))]
        raise PlacementError(f"adapter {worst!r}: {exc}") from None


def memory_cap(ctx: PlacementContext, max_lora_rank: int) -> int:
    """Largest max_loras whose KV cache holds one max_model_len request (0: none does)."""
    return ctx.memory_caps[max_lora_rank]


def check_rank_fits(ctx: PlacementContext, max_lora_rank: int) -> int:
    """``memory_cap`` or the profile's own "What fits" error when not even one slot fits."""
    cap = memory_cap(ctx, max_lora_rank)
    if cap < 1:
        ctx.profile.check_feasible(_config(ctx, 1, 1, max_lora_rank))  # raises, saying what fits
        raise InfeasibleConfigError(  # pragma: no cover - check_feasible agrees with the cap
            f"{ctx.profile.name}: no max_loras fits at max_lora_rank={max_lora_rank}"
        )
    return cap


def candidates(ctx: PlacementContext, n_adapters: int, cap: int) -> list[int]:
    """max_loras values to try for a replica with ``n_adapters`` adapters, memory cap and the
    context's ``max_loras_limit``."""
    top = max(1, min(n_adapters, cap, ctx.max_loras_limit or cap))
    return [g for g in ctx.max_loras_grid if g < top] + [top]


def _config(ctx: PlacementContext, max_loras: int, n_adapters: int, rank: int) -> EngineConfig:
    return _engine(max_loras, max(max_loras, n_adapters), rank, ctx.max_num_seqs,
                   ctx.max_num_batched_tokens, ctx.block_size, ctx.max_model_len)


@lru_cache(maxsize=1 << 16, typed=True)
def _engine(
    max_loras: int, max_cpu_loras: int, rank: int, max_num_seqs: int, max_num_batched_tokens: int,
    block_size: int, max_model_len: int | None,
) -> EngineConfig:
    """One shared (frozen, so safely shared) EngineConfig per set of values: searches ask for
    the same few hundred configs hundreds of thousands of times, and each construction runs
    vLLM's validation. Invalid values raise every time (exceptions are not cached)."""
    return EngineConfig(
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_lora_rank=rank,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=block_size,
        max_model_len=max_model_len,
    )


def engine_config(ctx: PlacementContext, load: ReplicaLoad, max_loras: int) -> EngineConfig:
    """The engine a replica with this load runs at ``max_loras`` (checked against memory)."""
    rank = slot_rank(load)
    cap = check_rank_fits(ctx, rank)
    if max_loras > cap:
        ctx.profile.check_feasible(_config(ctx, max_loras, load.n_adapters, rank))
    return _config(ctx, max_loras, load.n_adapters, rank)


# ---------------------------------------------------------------------------------------------
# feasibility and scaling
# ---------------------------------------------------------------------------------------------


def is_feasible(pred: dict[str, Any], ctx: PlacementContext) -> bool:
    """Not starved and completing at least ``min_served_fraction`` of the offered tokens."""
    if bool(pred["starved"]):
        return False
    offered = float(pred["offered_total_tps"])
    return offered <= 0 or float(pred["total_throughput_tps"]) >= (
        ctx.min_served_fraction * offered
    )


def feasible_rows(cols: dict[str, np.ndarray], ctx: PlacementContext) -> np.ndarray:
    """``is_feasible`` of every row of ``predict_columns`` output at once (same float64
    arithmetic, so the same verdicts)."""
    offered = cols["offered_total_tps"]
    served_enough = cols["total_throughput_tps"] >= ctx.min_served_fraction * offered
    return ~cols["starved"].astype(bool) & ((offered <= 0) | served_enough)


def _next_probe(
    lo: float, hi: float, estimate: float, was_feasible: bool, after_estimate: bool,
    may_estimate: bool, tol: float,
) -> tuple[float, bool] | None:
    """The next multiplier to try (and whether it came from the capacity estimate), or None
    when the bracket is tight enough (see ``max_feasible_scale``)."""
    if not np.isfinite(hi):
        return None if lo >= MAX_SCALE else (min(lo * 4.0, MAX_SCALE), False)
    if lo > 0 and hi / lo <= 1.0 + tol:
        return None
    if lo == 0 and hi <= MIN_SCALE:
        return None
    if not was_feasible and may_estimate and estimate > 0:
        guess = max(estimate * (1.0 - tol / 2.0), MIN_SCALE)
        if guess > lo * (1.0 + tol / 2.0) and guess < hi / (1.0 + tol / 2.0):
            return guess, True
    if was_feasible and after_estimate and lo * (1.0 + tol) < hi:
        return lo * (1.0 + tol), False  # the estimate was feasible: is one step more?
    if lo == 0:
        return max(hi / 4.0, MIN_SCALE), False
    return float(np.sqrt(lo * hi)), False


def scaled_load(load: ReplicaLoad, factor: float) -> ReplicaLoad:
    """The same replica with every rate multiplied by ``factor``.

    Skips ReplicaLoad's validation (ids, ranks and lengths are the validated originals and a
    positive factor keeps rates valid): searches build thousands of these.
    """
    if factor == 1.0:
        return load
    return ReplicaLoad.trusted(load.adapter_ids, load.ranks, load.rates_rps * float(factor),
                               load.lengths)


def max_feasible_scale(
    loads: Sequence[ReplicaLoad],
    configs: Sequence[EngineConfig],
    ctx: PlacementContext,
    *,
    tolerance: float | None = None,
    upper: bool = False,
) -> np.ndarray:
    """Per pair, the largest rate multiplier found feasible (0 if not even ``MIN_SCALE``,
    ``MAX_SCALE`` if still feasible there), to within ``tolerance``; all pairs advance
    together, one predictor call per step. ``upper=True`` returns the other end of the final
    bracket instead, the smallest multiplier found infeasible (an over-estimate, for bounds).

    Search: x4 expansion until infeasible; then, since an infeasible replica still reports what
    it served, its served fraction x the probe estimates the capacity, and the next probe goes
    just below that estimate and, if feasible, one tolerance step above it (at most
    ``_ESTIMATES`` times); geometric bisection otherwise.
    """
    n = len(loads)
    tol = ctx.headroom_tolerance if tolerance is None else tolerance
    lo = np.zeros(n)
    hi = np.full(n, np.inf)
    probe = np.ones(n)
    estimate = np.zeros(n)  # capacity estimate from the last infeasible probe (0: none)
    uses = np.zeros(n, dtype=np.int64)
    from_estimate = np.zeros(n, dtype=bool)
    active = [i for i in range(n) if loads[i].total_rate_rps > 0]
    lo[[i for i in range(n) if loads[i].total_rate_rps <= 0]] = MAX_SCALE
    while active:
        cols = predict_columns(
            ctx.predictor,
            [scaled_load(loads[i], probe[i]) for i in active], [configs[i] for i in active],
        )
        verdicts = feasible_rows(cols, ctx).tolist()
        offered_all = cols["offered_total_tps"].tolist()
        served_all = cols["total_throughput_tps"].tolist()
        still = []
        for i, feasible, offered, served in zip(active, verdicts, offered_all, served_all,
                                                strict=True):
            if feasible:
                lo[i] = probe[i]
            else:
                hi[i] = probe[i]
                estimate[i] = probe[i] * served / offered if offered > 0 and served > 0 else 0.0
            nxt = _next_probe(lo[i], hi[i], estimate[i], feasible, from_estimate[i],
                              uses[i] < _ESTIMATES, tol)
            if nxt is None:
                continue
            probe[i], from_estimate[i] = nxt
            uses[i] += int(from_estimate[i])
            still.append(i)
        active = still
    return np.where(np.isfinite(hi), hi, lo) if upper else lo


# ---------------------------------------------------------------------------------------------
# the optimum
# ---------------------------------------------------------------------------------------------


def optimise(
    loads: Sequence[ReplicaLoad],
    ctx: PlacementContext,
    *,
    headroom: bool = True,
    max_loras: Sequence[int | None] | None = None,
) -> list[ReplicaOptimum]:
    """The per-replica optimum of every load (module docstring), in few batched predictor calls.

    ``headroom=False`` only decides feasibility (one call; what sizing searches need) and keeps
    the feasible candidate with the most throughput. ``max_loras[i]`` pins replica i's slots.
    """
    if not loads:
        return []
    u = ctx.target_utilisation
    cands = _candidate_configs(loads, ctx, max_loras)
    judged = [scaled_load(ld, 1.0 / u) for ld in loads]
    pair_load = [judged[i] for i, cs in enumerate(cands) for _ in cs]
    pair_cfg = [c for cs in cands for c in cs]
    preds = ctx.predictor.predict(pair_load, pair_cfg)
    per: list[list[dict[str, Any]]] = []
    k = 0
    for cs in cands:
        per.append(preds[k : k + len(cs)])
        k += len(cs)
    ok = [[is_feasible(p, ctx) for p in ps] for ps in per]

    scale: dict[tuple[int, int], float] = {}
    if headroom:
        idx = [(i, j) for i, flags in enumerate(ok) for j, f in enumerate(flags) if f]
        idx += [(i, _best_throughput(per[i])) for i, flags in enumerate(ok) if not any(flags)]
        found = max_feasible_scale(
            [judged[i] for i, _ in idx], [cands[i][j] for i, j in idx], ctx
        )
        scale = {key: float(s) for key, s in zip(idx, found, strict=True)}

    chosen: list[tuple[int, bool]] = []
    for i, flags in enumerate(ok):
        feas = [j for j, f in enumerate(flags) if f]
        if not feas:
            chosen.append((_best_throughput(per[i]), False))
        elif headroom:
            best = max(scale[(i, j)] for j in feas)
            near = [j for j in feas if scale[(i, j)] >= best / (1.0 + 2.0 * ctx.headroom_tolerance)]
            chosen.append((min(near, key=lambda j: cands[i][j].max_loras), True))
        else:
            chosen.append((_best_throughput([per[i][j] for j in feas], feas), True))

    # figures at the actual load (the margin judged feasibility at load / u)
    if u < 1.0:
        picked = [cands[i][j] for i, (j, _) in enumerate(chosen)]
        actual = ctx.predictor.predict(list(loads), picked)
    else:
        actual = [per[i][j] for i, (j, _) in enumerate(chosen)]
    out = []
    for i, (j, feasible) in enumerate(chosen):
        h = scale.get((i, j)) if headroom else None
        out.append(
            ReplicaOptimum(
                engine=cands[i][j],
                predicted=dict(actual[i]),
                feasible=feasible,
                headroom=None if h is None else h / u,
            )
        )
    return out


def loads_feasible(
    loads: Sequence[ReplicaLoad],
    ctx: PlacementContext,
    *,
    max_loras: Sequence[int | None] | None = None,
) -> list[bool]:
    """Whether each load has a feasible max_loras: ``optimise(..., headroom=False)``'s verdict
    (same candidates, judged at load / ``target_utilisation``) without choosing a config or
    predicting the figures at the actual load, which sizing searches never read.

    Only the verdict matters, so the candidates of a large batch are judged in stages, largest
    max_loras first (on packing searches, the candidate most often feasible): each stage is one
    predictor call over the loads not yet found feasible, ``_FEASIBLE_STAGES`` candidates each,
    then all the rest. Predictions are per pair, so this finds what judging every candidate
    would, with one prediction instead of ten or more for most feasible loads.
    """
    if not loads:
        return []
    u = ctx.target_utilisation
    order = [cs[::-1] for cs in _candidate_configs(loads, ctx, max_loras)]
    judged = [scaled_load(ld, 1.0 / u) for ld in loads]
    verdict = [False] * len(loads)
    pending = list(range(len(loads)))
    start = 0
    staged = sum(len(cs) for cs in order) >= _STAGED_FROM
    for take in (*(_FEASIBLE_STAGES if staged else ()), None):
        stop = None if take is None else start + take
        owner = [i for i in pending for _ in order[i][start:stop]]
        cfgs = [c for i in pending for c in order[i][start:stop]]
        if not owner:
            break
        cols = predict_columns(ctx.predictor, [judged[i] for i in owner], cfgs)
        for i, ok in zip(owner, feasible_rows(cols, ctx).tolist(), strict=True):
            verdict[i] = verdict[i] or ok
        if stop is None:
            break
        start = stop
        pending = [i for i in pending if not verdict[i] and len(order[i]) > start]
    return verdict


def _candidate_configs(
    loads: Sequence[ReplicaLoad], ctx: PlacementContext,
    max_loras: Sequence[int | None] | None,
) -> list[list[EngineConfig]]:
    """Per load, the engine configs to try: the pinned ``max_loras[i]`` (checked against
    memory), else every candidate max_loras at the load's slot rank (one shared list per
    adapter count and slot rank: do not mutate)."""
    fixed = list(max_loras) if max_loras is not None else [None] * len(loads)
    caps: dict[int, int] = {}
    shared: dict[tuple[int, int], list[EngineConfig]] = {}
    cands: list[list[EngineConfig]] = []
    for load, pin in zip(loads, fixed, strict=True):
        rank = slot_rank(load)
        if rank not in caps:
            caps[rank] = check_rank_fits(ctx, rank)
        if pin is not None:
            cands.append([engine_config(ctx, load, pin)])
            continue
        n = load.n_adapters
        cs = shared.get((n, rank))
        if cs is None:
            cs = shared[(n, rank)] = [_config(ctx, g, n, rank)
                                      for g in candidates(ctx, n, caps[rank])]
        cands.append(cs)
    return cands


def replica_optimum(load: ReplicaLoad, ctx: PlacementContext) -> ReplicaOptimum:
    """max_loras, max_cpu_loras and headroom for one replica (see ``optimise``)."""
    return optimise([load], ctx)[0]


def _best_throughput(preds: Sequence[dict[str, Any]], index: Sequence[int] | None = None) -> int:
    """Position (in ``index`` terms) of the highest throughput; the first (smallest) on ties."""
    tps = [float(p["total_throughput_tps"]) for p in preds]
    best = max(tps)
    k = next(k for k, t in enumerate(tps) if t >= best * (1.0 - 1e-9))
    return index[k] if index is not None else k
