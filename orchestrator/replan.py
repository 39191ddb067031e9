"""Re-planning for the estimated workload, and whether the new plan is worth the move (#6, #16).

``replan`` plans the estimated workload at each target utilisation, re-rates the current
placement to the same workload (what keeping it would give), shrinks that placement in place
where the load allows (``placement.consolidate``: dropped copies, merged groups, few adapters
moved), verifies all of them with the caller's twin verification in one call, and scores them on
the verified figures. A new plan is applied only if it beats keeping the current one by
``margin`` plus the cost of moving there, in replica-seconds over the horizon a saved replica
pays back (``ReplanConfig``): twin scores carry noise and every move disturbs live traffic, so
near-ties keep the current plan, while a fleet that is replicas too large always comes back.
Exceptions: if the current placement starves at the new load and a candidate does not, the
candidate applies regardless; with live evidence that the fleet does not keep up
(``current_fails``), the cheapest candidate with more replicas applies.

Pure functions over ``placement`` objects; the Ray controller supplies ``verify`` (fan-out over
the cluster) and applies the decision.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from placement.consolidate import consolidate
from placement.errors import PlacementError
from placement.plan import PlacedAdapter, Plan, WorkloadRef, normalise_metrics
from placement.planner import check_budget, make_plan, prepare
from placement.policy import POLICIES, PlacementContext
from twin.config import EngineConfig
from twin.replica import ReplicaLoad, ReplicaPredictor
from twin.workload import AdapterSpec, Workload

Verify = Callable[[Sequence[Plan]], list[Plan]]  # the caller's twin verification
CURRENT = "current"
CONSOLIDATED = "consolidated"  # the current placement with copies dropped / groups merged


@dataclass(frozen=True)
class ReplanConfig:
    """Planning policy, score units and what a move costs.

    Scores are in replicas (one replica = ``replica_cost``); ``ttft_weight``: score per second
    the worst replica's TTFT p99 exceeds ``ttft_slo_s``. A move is priced in replica-seconds
    (each adapter that moves disturbs ``adapter_move_s``, each replica started costs
    ``replica_start_s`` of a replica that serves nothing yet) and set against what a better plan
    saves over ``payback_s``: a replica released is worth ``payback_s`` replica-seconds, so a
    fleet that is too large comes back even when every adapter moves.
    """

    policy: str = "lorafleet"
    target_utilisations: tuple[float, ...] = (1.0, 0.85)
    replica_cost: float = 1.0
    starved_cost: float = 100.0
    ttft_slo_s: float = 10.0
    ttft_weight: float = 0.1
    adapter_move_s: float = 2.0
    replica_start_s: float = 60.0
    payback_s: float = 1800.0
    margin: float = 0.1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy: unknown policy {self.policy!r}; known: {sorted(POLICIES)}")
        utils = tuple(self.target_utilisations)
        if not utils or any(not _num(u) or not 0.0 < u <= 1.0 for u in utils):
            raise ValueError(
                f"target_utilisations: must be a non-empty list within (0, 1], got {utils!r}"
            )
        object.__setattr__(self, "target_utilisations", utils)
        for name in ("replica_cost", "starved_cost", "ttft_weight", "adapter_move_s",
                     "replica_start_s", "margin"):
            value = getattr(self, name)
            if not _num(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        for name in ("ttft_slo_s", "payback_s"):
            value = getattr(self, name)
            if not _num(value) or value <= 0:
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _num(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------
# the current placement at the new rates; the candidates
# ---------------------------------------------------------------------------------------------


def rerate(
    current: Plan, workload: Workload, *, predictor: ReplicaPredictor | None = None
) -> Plan | None:
    """The current placement (groups, engine configs, routing weights) carrying ``workload``'s
    rates: one replica of a group gets ``rate x weight / copies``. Adapters the plan places but
    the workload lacks get rate 0. None if the workload has an adapter the plan does not place
    (or with a rank above its groups' ``max_lora_rank``): keeping the plan is then no option.

    ``verified`` is cleared and ``headroom`` dropped (both were for the old rates);
    ``predicted`` is refreshed with ``predictor`` when given, else kept as it was.
    """
    by_id = {a.id: a for a in workload.adapters}
    if any(a not in current.routing for a in by_id):
        return None
    weight = {(a, r.group): r.weight for a, routes in current.routing.items() for r in routes}
    groups = []
    for g in current.groups:
        placed = []
        for a in g.adapters:
            spec = by_id.get(a.id)
            if spec is not None and spec.rank > g.engine.max_lora_rank:
                return None
            rate = spec.rate_rps * weight[a.id, g.name] / g.copies if spec is not None else 0.0
            placed.append(PlacedAdapter(a.id, spec.rank if spec else a.rank, float(rate)))
        groups.append(replace(g, adapters=tuple(placed), verified=None, headroom=None))
    if predictor is not None:
        loads = [
            ReplicaLoad(
                adapter_ids=g.adapter_ids,
                ranks=np.array([a.rank for a in g.adapters], dtype=np.int64),
                rates_rps=np.array([a.rate_rps for a in g.adapters], dtype=np.float64),
                lengths=workload.lengths,
            )
            for g in groups
        ]
        predicted = predictor.predict(loads, [g.engine for g in groups])
        groups = [replace(g, predicted=normalise_metrics(m))
                  for g, m in zip(groups, predicted, strict=True)]
    ref = WorkloadRef(
        name=workload.name,
        n_adapters=len(current.routing),
        total_rate_rps=workload.total_rate_rps - workload.base_model_rate_rps,
        offered_total_tps=(workload.total_rate_rps - workload.base_model_rate_rps)
        * (workload.lengths.mean_prompt() + workload.lengths.mean_output()),
        lengths=workload.lengths.to_dict(),
    )
    return replace(current, groups=tuple(groups), workload=ref)


def _plannable(workload: Workload) -> Workload:
    """Placement does not place base-model traffic yet (``check_servable``), so it is left out
    of re-planning rather than blocking it."""
    if workload.base_model_rate_rps <= 0:
        return workload
    if not workload.adapters:
        raise PlacementError(f"workload {workload.name!r}: no adapters to place")
    return replace(workload, base_model_rate_rps=0.0)


def _labelled_candidates(
    workload: Workload, ctx: PlacementContext, cfg: ReplanConfig
) -> list[tuple[str, Plan]]:
    workload = _plannable(workload)
    budget = ctx.gpu_budget
    # plan without the budget and filter here: an over-budget make_plan searches what would fit
    # (seconds), which only the error of the last resort needs
    free = prepare(workload, replace(ctx, lower_bound=None, gpu_budget=None))
    out: list[tuple[str, Plan]] = []
    seen: set[tuple] = set()
    failed: list[PlacementError | Plan] = []  # in order: errors, and plans over the budget
    for u in cfg.target_utilisations:
        try:
            plan = make_plan(workload, replace(free, target_utilisation=u), cfg.policy)
        except PlacementError as exc:
            failed.append(exc)
            continue
        if budget is not None and plan.replicas > budget:
            failed.append(plan)
            continue
        key = _signature(plan)
        if key not in seen:  # two utilisations often give the same plan: verify it once
            seen.add(key)
            out.append((f"u={u:g}", plan))
    if not out:
        first = failed[0]
        if isinstance(first, PlacementError):
            raise first
        check_budget(first, workload, replace(free, gpu_budget=budget), cfg.policy)  # raises
        raise PlacementError(f"gpu_budget {budget}: every candidate plan exceeds it")
    return out


def candidate_plans(
    workload: Workload, ctx: PlacementContext, cfg: ReplanConfig | None = None
) -> list[Plan]:
    """``make_plan`` at each target utilisation (identical plans once). Utilisations that raise
    ``PlacementError`` (e.g. over the GPU budget) are skipped; if all do, the first error is
    raised. Base-model traffic is left out (placement cannot place it yet)."""
    return [p for _, p in _labelled_candidates(workload, ctx, cfg or ReplanConfig())]


def _placement(plan: Plan) -> tuple:
    """Which adapters share a replica, on which config, how many times (rates aside)."""
    return tuple(sorted((tuple(sorted(g.adapter_ids)), g.copies, repr(g.engine))
                        for g in plan.groups))


def _signature(plan: Plan) -> tuple:
    return tuple(
        (g.engine, g.copies, tuple((a.id, round(a.rate_rps, 9)) for a in g.adapters))
        for g in plan.groups
    )


# ---------------------------------------------------------------------------------------------
# move cost and score
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoveCost:
    """What going from one plan to another disturbs, and its cost in score units."""

    adapters_moved: int
    replicas_started: int
    replicas_stopped: int
    cost: float


def _replicas_by_config(plan: Plan) -> Counter[EngineConfig]:
    out: Counter[EngineConfig] = Counter()
    for g in plan.groups:
        out[g.engine] += g.copies
    return out


def _serving(plan: Plan, adapter: str) -> Counter[EngineConfig]:
    out: Counter[EngineConfig] = Counter()
    for r in plan.routing.get(adapter, ()):
        g = plan.group(r.group)
        out[g.engine] += g.copies
    return out


def move_cost(old: Plan, new: Plan, cfg: ReplanConfig | None = None) -> MoveCost:
    """Adapters moved: new ones, and those whose multiset of serving engine configs (copies
    counted) changes. Replicas: per engine config, the difference in replica count; replicas
    with an unchanged config are re-targeted to their new adapters without a restart, so only
    the difference starts or stops. The cost is in replicas (score units): the replica-seconds
    the move disturbs over ``payback_s``. Stops cost nothing (they save)."""
    cfg = cfg or ReplanConfig()
    moved = sum(1 for a in new.routing
                if a not in old.routing or _serving(old, a) != _serving(new, a))
    before, after = _replicas_by_config(old), _replicas_by_config(new)
    started = sum(max(0, n - before.get(c, 0)) for c, n in after.items())
    stopped = sum(max(0, n - after.get(c, 0)) for c, n in before.items())
    seconds = moved * cfg.adapter_move_s + started * cfg.replica_start_s
    cost = cfg.replica_cost * seconds / cfg.payback_s
    return MoveCost(moved, started, stopped, round(cost, 9))


def score(plan: Plan, cfg: ReplanConfig | None = None) -> float:
    """Lower is better: replicas + a large penalty per starved replica + a penalty per second
    the worst replica's TTFT p99 exceeds the SLO. On verified figures when the plan has them."""
    cfg = cfg or ReplanConfig()
    src = plan.metrics_source()
    ttft_s = plan.worst("ttft_p99_ms", src) / 1e3
    over = max(0.0, ttft_s - cfg.ttft_slo_s) if math.isfinite(ttft_s) else 0.0
    return (plan.replicas * cfg.replica_cost + plan.starved_replicas(src) * cfg.starved_cost
            + over * cfg.ttft_weight)


# ---------------------------------------------------------------------------------------------
# the decision
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether to apply ``plan`` (the best candidate, verified; set even when not applied).

    ``scores``: every verified plan's score by label (``current`` = the current placement
    re-rated to the workload); ``move``: from the current plan to ``plan``;
    ``current_plan``: that re-rated, verified current placement (None if there is none), whose
    figures are what keeping the plan is predicted to give; ``timings``: plan_s, verify_s.
    """

    apply: bool
    plan: Plan | None
    reason: str
    current_score: float | None
    scores: dict[str, float]
    move: MoveCost | None
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)
    current_plan: Plan | None = None


def replan(
    workload: Workload,
    ctx: PlacementContext,
    current: Plan | None,
    cfg: ReplanConfig | None,
    verify: Verify,
    *,
    current_fails: str | None = None,
) -> Decision:
    """Plan ``workload``, verify the candidates and the re-rated current plan in ONE ``verify``
    call, and decide (module notes). Raises ``PlacementError`` if no candidate can be planned.

    ``current_fails``: live evidence that the current fleet does not keep up whatever the twin
    says of it (a queue that grows, in words): only a candidate with more replicas may win."""
    cfg = cfg or ReplanConfig()
    t0 = time.perf_counter()
    labelled = _labelled_candidates(workload, ctx, cfg)
    rerated = rerate(current, _plannable(workload), predictor=ctx.predictor) if current else None
    if rerated is not None and current_fails is None:
        tight = replace(ctx, target_utilisation=max(cfg.target_utilisations))
        shrunk = consolidate(rerated, tight)
        if shrunk.replicas < rerated.replicas:
            labelled.append((CONSOLIDATED, shrunk))
    plan_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    batch = [p for _, p in labelled] + ([rerated] if rerated is not None else [])
    checked = list(verify(batch))
    if len(checked) != len(batch):
        raise ValueError(f"verify: returned {len(checked)} plans for {len(batch)}")
    verify_s = time.perf_counter() - t1

    cands = [(label, plan) for (label, _), plan in zip(labelled, checked, strict=False)]
    scores = {label: score(p, cfg) for label, p in cands}
    kept = checked[-1] if rerated is not None else None
    current_score = score(kept, cfg) if kept is not None else None
    if current_score is not None:
        scores[CURRENT] = current_score
    timings = {"plan_s": round(plan_s, 4), "verify_s": round(verify_s, 4)}

    def done(apply: bool, label: str, move: MoveCost | None, reason: str) -> Decision:
        winner = dict(cands)[label]
        return Decision(apply=apply, plan=winner, reason=reason, current_score=current_score,
                        scores=scores, move=move, wall_s=round(time.perf_counter() - t0, 4),
                        timings=timings, current_plan=kept)

    def describe(label: str) -> str:
        p = dict(cands)[label]
        return f"{label} ({_n(p.replicas, 'replica')}, score {scores[label]:.2f})"

    if current is None:
        best = min(cands, key=lambda c: (scores[c[0]], c[1].replicas))[0]
        return done(True, best, None, f"no current plan: applying {describe(best)}")

    moves = {label: move_cost(current, p, cfg) for label, p in cands}

    def total(label: str) -> tuple[float, int]:
        return scores[label] + moves[label].cost, dict(cands)[label].replicas

    best = min(scores.keys() - {CURRENT}, key=lambda lb: (*total(lb), lb))
    if kept is None:
        unplaced = sorted(a.id for a in workload.adapters if a.id not in current.routing)
        what = f"does not place {', '.join(unplaced[:5])}" if unplaced else (
            "cannot serve an adapter's rank")
        return done(True, best, moves[best],
                    f"the current plan {what}: applying {describe(best)}")

    assert current_score is not None
    if current_fails is not None:
        # the candidates were planned with the capacity the evidence leaves; any of them that
        # places the adapters differently (more replicas, or the hot ones apart) is a remedy
        other = [lb for lb, p in cands if _placement(p) != _placement(current)]
        if not other:
            return done(False, best, moves[best], f"{current_fails}, but every candidate plan "
                        "places the adapters as the current one does: keeping it")
        pick = min(other, key=lambda lb: (*total(lb), lb))
        return done(True, pick, moves[pick], f"{current_fails}: applying {describe(pick)}")
    if kept.starved_replicas() > 0:
        fed = [lb for lb, p in cands if p.starved_replicas() == 0]
        if fed:
            pick = min(fed, key=lambda lb: (*total(lb), lb))
            return done(True, pick, moves[pick],
                        f"the current plan starves {kept.starved_replicas()} replica(s) at the "
                        f"estimated load; applying {describe(pick)}")
    gain = current_score - scores[best]
    need = cfg.margin + moves[best].cost
    m = moves[best]
    cost = (f"margin {cfg.margin:.2f} + move cost {m.cost:.2f} ({_n(m.adapters_moved, 'adapter')} "
            f"moved, {_n(m.replicas_started, 'replica')} started)")
    if gain > need:
        return done(True, best, m, f"{describe(best)} beats the current plan "
                    f"({current_score:.2f}) by {gain:.2f} > {cost}")
    return done(False, best, m, f"keeping the current plan ({current_score:.2f}): best "
                f"candidate {describe(best)} gains {gain:.2f} <= {cost}")


# ---------------------------------------------------------------------------------------------
# what-if
# ---------------------------------------------------------------------------------------------


def whatif_workload(
    workload: Workload,
    *,
    rate_scale: float = 1.0,
    add: Sequence[AdapterSpec] = (),
    remove: Collection[str] = (),
) -> Workload:
    """``workload`` with every rate times ``rate_scale``, the ``remove`` ids dropped, then the
    ``add`` adapters appended at their own rates (not scaled). Removing and re-adding an id in
    one call replaces it. ValueError naming the field/id for an unknown id to remove, a
    duplicate id to add, or ``rate_scale <= 0``."""
    if not _num(rate_scale) or rate_scale <= 0:
        raise ValueError(f"rate_scale: must be a finite number > 0, got {rate_scale!r}")
    ids = {a.id for a in workload.adapters}
    for a in remove:
        if a not in ids:
            raise ValueError(f"remove: unknown adapter id {a!r}")
    drop = set(remove)
    scaled = workload.scaled(rate_scale)
    kept = [a for a in scaled.adapters if a.id not in drop]
    have = {a.id for a in kept}
    for i, a in enumerate(add):
        if not isinstance(a, AdapterSpec):
            raise ValueError(f"add[{i}]: must be an AdapterSpec, got {a!r}")
        if a.id in have:
            raise ValueError(f"add[{i}]: duplicate adapter id {a.id!r}")
        have.add(a.id)
        kept.append(a)
    return replace(scaled, name=f"{workload.name}-whatif", adapters=tuple(kept))
