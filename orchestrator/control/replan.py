"""Re-planning for the estimated workload, and whether the new plan is worth the move (#6, #16).

The plans come from the one choice rule (``placement.choose``: candidates at each target
utilisation, twin verification, tightening while the twin starves a replica, score). What is the
controller's own is here: the current placement re-rated to the estimated workload (what keeping
it would give), shrunk in place where the load allows (``placement.consolidate``: dropped
copies, merged groups, few adapters moved) as one more candidate, and the cost of moving, in
replica-seconds over the horizon a saved replica pays back (``ReplanConfig``). A new plan is
applied only if it beats keeping the current one by ``margin`` plus that cost: twin scores carry
noise and every move disturbs live traffic, so near-ties keep the current plan, while a fleet
that is replicas too large always comes back. Exceptions: if the current placement starves at
the new load and a candidate does not, the candidate applies regardless; with live evidence that
the fleet does not keep up (``current_fails``), the cheapest candidate placing the adapters
differently applies.

Pure functions over ``placement`` objects; the Ray controller supplies ``verify`` (fan-out over
the cluster) and applies the decision.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from placement.choose import Candidate, ChoiceRule, Verify, best, candidates, score, settle
from placement.consolidate import consolidate
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.plan import PlacedAdapter, Plan, WorkloadRef, normalise_metrics
from placement.planner import prepare
from twin.config import EngineConfig
from twin.replica import ReplicaLoad, ReplicaPredictor
from twin.workload import AdapterSpec, Workload

CURRENT = "current"
CONSOLIDATED = "consolidated"  # the current placement with copies dropped / groups merged


@dataclass(frozen=True)
class ReplanConfig(ChoiceRule):
    """The choice rule (``placement.choose.ChoiceRule``: candidates, tightening, score) plus
    what is the controller's own: what a move costs and by how much a new plan must win.

    A move is priced in replica-seconds (each adapter that moves disturbs ``adapter_move_s``,
    each replica started costs ``replica_start_s`` of a replica that serves nothing yet) and set
    against what a better plan saves over ``payback_s``: a replica released is worth
    ``payback_s`` replica-seconds, so a fleet that is too large comes back even when every
    adapter moves.

    The controller does not relax (``relax_rounds`` 0): when live queues show replicas
    delivering less than the twin gives them, its candidates are planned at that lower capacity
    (``capacity_factor``), and a twin that does not know it would take the margin back.
    """

    relax_rounds: int = 0
    adapter_move_s: float = 2.0
    replica_start_s: float = 60.0
    payback_s: float = 1800.0
    margin: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("adapter_move_s", "replica_start_s", "margin"):
            value = getattr(self, name)
            if not _num(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if not _num(self.payback_s) or self.payback_s <= 0:
            raise ValueError(f"payback_s: must be a finite number > 0, got {self.payback_s!r}")


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


def candidate_plans(
    workload: Workload, ctx: PlacementContext, cfg: ReplanConfig | None = None
) -> list[Plan]:
    """The rule's candidates (``placement.choose.candidates``) for the estimated workload, its
    base-model traffic left out (placement cannot place it yet); ``ctx``'s lower bound and
    estimate, from an earlier workload, are recomputed."""
    workload = _plannable(workload)
    fresh = prepare(workload, replace(ctx, lower_bound=None, estimate=None, gpu_budget=None))
    fresh = replace(fresh, gpu_budget=ctx.gpu_budget)
    return [c.plan for c in candidates(workload, fresh, cfg or ReplanConfig())]


def _placement(plan: Plan) -> tuple:
    """Which adapters share a replica, on which config, how many times (rates aside)."""
    return tuple(sorted((tuple(sorted(g.adapter_ids)), g.copies, repr(g.engine))
                        for g in plan.groups))


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
    """Choose by ``placement.choose``'s rule among the candidates, the current placement
    consolidated and (as the reference) the current placement re-rated, all verified in ONE
    ``verify`` call before tightening; then decide with the move cost (module notes). Raises
    ``PlacementError`` if no candidate can be planned.

    ``current_fails``: live evidence that the current fleet does not keep up whatever the twin
    says of it (a queue that grows, in words): only a candidate placing the adapters differently
    may win."""
    cfg = cfg or ReplanConfig()
    t0 = time.perf_counter()
    plannable = _plannable(workload)
    fresh = prepare(plannable, replace(ctx, lower_bound=None, estimate=None, gpu_budget=None))
    fresh = replace(fresh, gpu_budget=ctx.gpu_budget)
    cands = candidates(plannable, fresh, cfg)
    rerated = rerate(current, plannable, predictor=ctx.predictor) if current else None
    if rerated is not None and current_fails is None:
        tight = replace(fresh, target_utilisation=max(cfg.target_utilisations))
        shrunk = consolidate(rerated, tight)
        if shrunk.replicas < rerated.replicas:
            cands.append(Candidate(CONSOLIDATED, shrunk))
    plan_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    reference = [Candidate(CURRENT, rerated)] if rerated is not None else []
    checked = settle([*cands, *reference], plannable, fresh, verify, cfg)
    verify_s = time.perf_counter() - t1

    kept = checked[-1].plan if rerated is not None else None
    cands = checked[:-1] if rerated is not None else checked
    scores = {c.label: score(c.plan, cfg) for c in cands}
    current_score = score(kept, cfg) if kept is not None else None
    if current_score is not None:
        scores[CURRENT] = current_score
    timings = {"plan_s": round(plan_s, 4), "verify_s": round(verify_s, 4)}

    def done(apply: bool, c: Candidate, move: MoveCost | None, reason: str) -> Decision:
        return Decision(apply=apply, plan=c.plan, reason=reason, current_score=current_score,
                        scores=scores, move=move, wall_s=round(time.perf_counter() - t0, 4),
                        timings=timings, current_plan=kept)

    def describe(c: Candidate) -> str:
        return f"{c.label} ({_n(c.plan.replicas, 'replica')}, score {scores[c.label]:.2f})"

    if current is None:
        pick = best(cands, cfg)
        return done(True, pick, None, f"no current plan: applying {describe(pick)}")

    moves = {c.label: move_cost(current, c.plan, cfg) for c in cands}

    def choose(among: list[Candidate]) -> Candidate:
        return best(among, cfg, extra=lambda c: moves[c.label].cost)

    top = choose(cands)
    if kept is None:
        unplaced = sorted(a.id for a in workload.adapters if a.id not in current.routing)
        what = f"does not place {', '.join(unplaced[:5])}" if unplaced else (
            "cannot serve an adapter's rank")
        return done(True, top, moves[top.label],
                    f"the current plan {what}: applying {describe(top)}")

    assert current_score is not None
    if current_fails is not None:
        # the candidates were planned with the capacity the evidence leaves; any of them that
        # places the adapters differently (more replicas, or the hot ones apart) is a remedy
        other = [c for c in cands if _placement(c.plan) != _placement(current)]
        if not other:
            return done(False, top, moves[top.label], f"{current_fails}, but every candidate "
                        "plan places the adapters as the current one does: keeping it")
        pick = choose(other)
        return done(True, pick, moves[pick.label], f"{current_fails}: applying {describe(pick)}")
    if kept.starved_replicas() > 0:
        fed = [c for c in cands if c.plan.starved_replicas() == 0]
        if fed:
            pick = choose(fed)
            return done(True, pick, moves[pick.label],
                        f"the current plan starves {kept.starved_replicas()} replica(s) at the "
                        f"estimated load; applying {describe(pick)}")
    gain = current_score - scores[top.label]
    m = moves[top.label]
    need = cfg.margin + m.cost
    cost = (f"margin {cfg.margin:.2f} + move cost {m.cost:.2f} ({_n(m.adapters_moved, 'adapter')} "
            f"moved, {_n(m.replicas_started, 'replica')} started)")
    if gain > need:
        return done(True, top, m, f"{describe(top)} beats the current plan "
                    f"({current_score:.2f}) by {gain:.2f} > {cost}")
    return done(False, top, m, f"keeping the current plan ({current_score:.2f}): best "
                f"candidate {describe(top)} gains {gain:.2f} <= {cost}")


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
