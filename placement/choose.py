"""Choosing a plan: the one rule behind ``lorafleet plan`` (verified by default),
``plan --compare`` and the controller's re-planning.

1. **Candidates**: the policy's plan at each target utilisation of the rule (identical plans
   once; over the GPU budget left out, the budget error only when none fits).
2. **Twin verification** of every candidate in one call of the caller's ``verify`` (a process
   pool for the CLI, a Ray fan-out for the controller).
3. **Tightening**: while the twin starves a replica of a candidate that lorafleet planned
   (``SETTLES_ON_TWIN``), it is planned again at ``tightening`` x the utilisation it used and
   verified again, at most ``settle_rounds`` times. The predictor packs to the edge of what *it*
   believes; the twin is the ground truth, so a replica it starves costs a replica more, not a
   starved plan. **Relaxing**, the other direction: for a candidate the twin accepts, a
   bisection on the replica count down to the lower bound, each count packed by
   ``make_plan_within`` and verified, the fewest the twin accepts kept (``relax_rounds``
   rounds). The predictor's edge is a few per cent off either way (the surrogate's throughput
   near capacity), and at two or three replicas a few per cent is a whole replica; for long
   requests the surrogate is off by more (audit-028: 19 replicas planned, 10 accepted).
   Baselines are reported as published.
4. **Choosing**: the lowest ``score`` (replicas, a large penalty per starved replica, a penalty
   per second of TTFT p99 over the SLO), plus whatever cost the caller adds per candidate (the
   controller's move cost against the running plan); ties go to fewer replicas, then the label.

Pure functions of their inputs: ``verify`` is the only effect, and it is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from placement.analytic import AnalyticPredictor
from placement.budget import check_budget
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.plan import Plan
from placement.planner import make_plan, make_plan_within, prepare
from placement.policy import POLICIES, get_policy
from twin.workload import Workload

Verify = Callable[[Sequence[Plan]], list[Plan]]  # plans in, the same plans verified out
ExtraCost = Callable[["Candidate"], float]

# policies whose plan is re-planned tighter while the twin starves a replica: lorafleet's own
# rule ("no starved replica"), not the baselines' (as published)
SETTLES_ON_TWIN: frozenset[str] = frozenset({"lorafleet"})


def _num(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class ChoiceRule:
    """Which candidates, how they are tightened, and how they are scored.

    Scores are in replicas (one replica = ``replica_cost``); ``ttft_weight``: score per second
    the worst replica's TTFT p99 exceeds ``ttft_slo_s``; ``starved_cost`` per starved replica.
    """

    policy: str = "lorafleet"
    target_utilisations: tuple[float, ...] = (1.0, 0.85)
    tightening: float = 0.95
    settle_rounds: int = 3
    relax_rounds: int = 3
    replica_cost: float = 1.0
    starved_cost: float = 100.0
    ttft_slo_s: float = 10.0
    ttft_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy: unknown policy {self.policy!r}; known: {sorted(POLICIES)}")
        utils = tuple(self.target_utilisations)
        if not utils or any(not _num(u) or not 0.0 < u <= 1.0 for u in utils):
            raise ValueError(
                f"target_utilisations: must be a non-empty list within (0, 1], got {utils!r}"
            )
        object.__setattr__(self, "target_utilisations", utils)
        if not _num(self.tightening) or not 0.0 < self.tightening < 1.0:
            raise ValueError(f"tightening: must be within (0, 1), got {self.tightening!r}")
        for name in ("settle_rounds", "relax_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
        for name in ("replica_cost", "starved_cost", "ttft_weight"):
            value = getattr(self, name)
            if not _num(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if not _num(self.ttft_slo_s) or self.ttft_slo_s <= 0:
            raise ValueError(f"ttft_slo_s: must be a finite number > 0, got {self.ttft_slo_s!r}")


@dataclass(frozen=True)
class Candidate:
    """A plan under consideration. ``utilisation``: the target it was planned at, None for a
    plan not made by the policy (e.g. the running placement consolidated), never re-planned."""

    label: str
    plan: Plan
    utilisation: float | None = None


def signature(plan: Plan) -> tuple:
    """Engine configs, copies and adapter rates of every group: equal plans verify once."""
    return tuple(
        (g.engine, g.copies, tuple((a.id, round(a.rate_rps, 9)) for a in g.adapters))
        for g in plan.groups
    )


def candidates(workload: Workload, ctx: PlacementContext, rule: ChoiceRule) -> list[Candidate]:
    """The policy's plan at each of the rule's target utilisations, identical plans once, those
    over ``ctx.gpu_budget`` left out. If none is left, the first ``PlacementError`` is raised,
    or the budget error saying what would fit. ``ctx``'s lower bound and estimate, if set, must
    be ``workload``'s (``prepare``)."""
    budget = ctx.gpu_budget
    # plan without the budget and filter here: an over-budget make_plan searches what would fit
    # (seconds), which only the error of the last resort needs
    free = prepare(workload, replace(ctx, gpu_budget=None))
    out: list[Candidate] = []
    seen: set[tuple] = set()
    failed: list[PlacementError | Plan] = []  # in order: errors, and plans over the budget
    for u in rule.target_utilisations:
        try:
            plan = make_plan(workload, replace(free, target_utilisation=u), rule.policy)
        except PlacementError as exc:
            failed.append(exc)
            continue
        if budget is not None and plan.replicas > budget:
            failed.append(plan)
            continue
        key = signature(plan)
        if key not in seen:  # two utilisations often give the same plan: verify it once
            seen.add(key)
            out.append(Candidate(f"u={u:g}", plan, u))
    if not out:
        first = failed[0]
        if isinstance(first, PlacementError):
            raise first
        check_budget(first, workload, replace(free, gpu_budget=budget),
                     get_policy(rule.policy))  # raises
        raise PlacementError(f"gpu_budget {budget}: every candidate plan exceeds it")
    return out


def settle(
    cands: Sequence[Candidate],
    workload: Workload,
    ctx: PlacementContext,
    verify: Verify,
    rule: ChoiceRule,
) -> list[Candidate]:
    """Every candidate verified (the unverified ones in one ``verify`` call), then tightened
    while the twin starves one of its replicas (module notes, step 3): each round re-plans all
    such candidates at once and verifies them in one call. A tighter plan over ``ctx``'s GPU
    budget, or one that fails to plan, ends that candidate's tightening with the plan it has.
    Then ``relax``."""
    out = list(cands)
    todo = [i for i, c in enumerate(out) if not c.plan.is_verified]
    if todo:
        checked = _verify(verify, [out[i].plan for i in todo])
        for i, plan in zip(todo, checked, strict=True):
            out[i] = replace(out[i], plan=plan)
    free = replace(ctx, gpu_budget=None)
    for _ in range(rule.settle_rounds):
        retry: list[tuple[int, Candidate]] = []
        for i, c in enumerate(out):
            if (c.utilisation is None or c.plan.policy not in SETTLES_ON_TWIN
                    or c.plan.starved_replicas() == 0):
                continue
            used = float(c.plan.settings.get("target_utilisation", c.utilisation))
            tighter = round(used * rule.tightening, 4)
            try:
                plan = make_plan(workload, replace(free, target_utilisation=tighter),
                                 c.plan.policy)
            except PlacementError:
                continue
            if ctx.gpu_budget is not None and plan.replicas > ctx.gpu_budget:
                continue
            retry.append((i, Candidate(c.label, plan, tighter)))
        if not retry:
            break
        checked = _verify(verify, [c.plan for _, c in retry])
        for (i, c), plan in zip(retry, checked, strict=True):
            out[i] = replace(c, plan=plan)
    return relax(out, workload, ctx, verify, rule)


def relax(
    cands: Sequence[Candidate],
    workload: Workload,
    ctx: PlacementContext,
    verify: Verify,
    rule: ChoiceRule,
) -> list[Candidate]:
    """Step 3, the other direction (module notes): for each verified candidate lorafleet
    planned that the twin accepts, a bisection on the replica count between it and the plan's
    lower bound (no plan has fewer). Each round packs every open candidate on the middle count
    twice — with ``ctx``'s predictor and with the analytic one (``make_plan_within``; the two
    choose groups and slots differently, and where the surrogate's choice starves the other's
    is often fed) — verifies all packings in one call (equal ones once), and moves the
    candidate's upper end down to the fewest replicas the twin accepts, or the lower end up to
    the count it starves both at. ``rule.relax_rounds`` rounds."""
    out = list(cands)
    free = replace(ctx, gpu_budget=None)
    packers = [free, free.with_predictor(AnalyticPredictor(ctx.profile))]
    lows: dict[int, int] = {}  # candidate -> the most replicas known (or bounded) too few
    for i, c in enumerate(out):
        p = c.plan
        if (c.utilisation is not None and p.policy in SETTLES_ON_TWIN and p.is_verified
                and not p.starved_replicas()):
            lows[i] = max(0, (p.lower_bound_replicas or 1) - 1)
    for _ in range(rule.relax_rounds):
        tries: dict[tuple, Plan] = {}
        asked: dict[int, tuple[int, list[tuple]]] = {}  # candidate -> (count, its packings)
        for i in sorted(lows):
            hi = out[i].plan.replicas
            if hi - lows[i] <= 1:
                del lows[i]
                continue
            k = (lows[i] + hi) // 2
            keys = []
            for packer in packers:
                try:
                    fewer = make_plan_within(workload, packer, k, out[i].plan.policy)
                except PlacementError:
                    fewer = None
                if fewer is not None:
                    keys.append(signature(fewer))
                    tries.setdefault(keys[-1], fewer)
            if keys:
                asked[i] = (k, keys)
            else:
                lows[i] = k  # not even a sliver of the load packs on k
        if not tries:
            if not lows:
                break
            continue
        checked = dict(zip(tries, _verify(verify, list(tries.values())), strict=True))
        for i, (k, keys) in asked.items():
            fed = [checked[key] for key in keys if not checked[key].starved_replicas()]
            if not fed:
                lows[i] = max(lows[i], k)  # the twin starves both packings: more are needed
                continue
            plan = min(fed, key=lambda p: p.replicas)
            if plan.replicas < out[i].plan.replicas:
                out[i] = replace(out[i], plan=plan)
    return out


def _verify(verify: Verify, plans: list[Plan]) -> list[Plan]:
    checked = list(verify(plans))
    if len(checked) != len(plans):
        raise ValueError(f"verify: returned {len(checked)} plans for {len(plans)}")
    return checked


def score(plan: Plan, rule: ChoiceRule | None = None) -> float:
    """Lower is better: replicas + a large penalty per starved replica + a penalty per second
    the worst replica's TTFT p99 exceeds the SLO. On verified figures when the plan has them."""
    rule = rule or ChoiceRule()
    src = plan.metrics_source()
    ttft_s = plan.worst("ttft_p99_ms", src) / 1e3
    over = max(0.0, ttft_s - rule.ttft_slo_s) if math.isfinite(ttft_s) else 0.0
    return (plan.replicas * rule.replica_cost + plan.starved_replicas(src) * rule.starved_cost
            + over * rule.ttft_weight)


def best(
    cands: Sequence[Candidate], rule: ChoiceRule, extra: ExtraCost | None = None
) -> Candidate:
    """The candidate with the lowest ``score`` + ``extra`` (fewer replicas, then the label, on
    a tie)."""
    if not cands:
        raise ValueError("best: no candidates")

    def key(c: Candidate) -> tuple[float, int, str]:
        return score(c.plan, rule) + (extra(c) if extra else 0.0), c.plan.replicas, c.label

    return min(cands, key=key)


def choose_plan(
    workload: Workload, ctx: PlacementContext, rule: ChoiceRule, verify: Verify
) -> Plan:
    """Steps 1-4 for a caller with no running plan (``lorafleet plan``)."""
    ctx = prepare(workload, ctx)
    return best(settle(candidates(workload, ctx, rule), workload, ctx, verify, rule), rule).plan
