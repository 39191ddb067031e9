"""Scale-down candidates that keep adapters where they are: drop copies, merge groups.

A fleet sized for more load than it now gets must be able to return to what the load needs. A
fresh plan for the lower load usually places adapters differently, and moving hundreds of them
may not look worth a replica or two; so the re-planner also considers shrinking the *running*
placement. ``consolidate(plan, ctx)`` takes the current plan already carrying the new rates
(``rerate``) and, while the predictor says every replica stays feasible, frees one replica at a
time:

* drop one copy of a replicated group: nothing moves, its other copies share the traffic;
* merge two single-copy groups onto one replica: the union of their adapters at their summed
  rates, with the engine config the per-replica optimum chooses for the merged load.

Dropping copies comes first (no adapter moves). Merges are tried among the ``MERGE_POOL`` least
loaded groups (by predicted utilisation, 1 / headroom at the actual load), and the merge whose
replica keeps the most headroom wins. Pure: a function of the plan, the context and its
predictor; the twin verifies the result like any other candidate.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from placement.context import PlacementContext
from placement.plan import PlacedAdapter, Plan, ReplicaGroup, Route, normalise_metrics
from placement.replica_optimum import is_feasible, max_feasible_scale, optimise, scaled_load
from twin.config import EngineConfig
from twin.lengths import LengthModel
from twin.replica import ReplicaLoad

MERGE_POOL = 8  # the least loaded groups whose pairs are tried as merges at each step


@dataclass(frozen=True)
class _Group:
    """A group while consolidating: per-adapter rates summed over its copies."""

    name: str
    totals: dict[str, float]  # adapter -> rate over all copies
    ranks: dict[str, int]
    engine: EngineConfig
    copies: int

    def load(self, lengths: LengthModel, copies: int | None = None) -> ReplicaLoad:
        ids = tuple(sorted(self.totals))
        n = copies or self.copies
        return ReplicaLoad(ids, np.array([self.ranks[a] for a in ids], dtype=np.int64),
                           np.array([self.totals[a] / n for a in ids], dtype=np.float64), lengths)


def consolidate(plan: Plan, ctx: PlacementContext) -> Plan:
    """``plan`` with as many replicas freed as the predictor allows (module notes). Returns
    ``plan`` itself when nothing can be freed. ``plan`` must carry the rates to judge (a
    re-rated current plan); its routing weights keep each adapter's split between groups."""
    lengths = plan.workload.length_model()
    groups = [_Group(g.name, {a.id: a.rate_rps * g.copies for a in g.adapters},
                     {a.id: a.rank for a in g.adapters}, g.engine, g.copies)
              for g in plan.groups]
    changed = False
    while True:
        step = _drop_copy(groups, lengths, ctx) or _merge(groups, lengths, ctx)
        if step is None:
            break
        groups, changed = step, True
    if not changed:
        return plan
    return _as_plan(plan, groups, lengths, ctx)


def _feasible(loads: Sequence[ReplicaLoad], engines: Sequence[EngineConfig],
              ctx: PlacementContext) -> list[bool]:
    judged = [scaled_load(ld, 1.0 / ctx.target_utilisation) for ld in loads]
    return [is_feasible(p, ctx) for p in ctx.predictor.predict(judged, list(engines))]


def _drop_copy(groups: list[_Group], lengths: LengthModel, ctx: PlacementContext
               ) -> list[_Group] | None:
    """One copy fewer of the replicated group that stays feasible with the most headroom."""
    cands = [i for i, g in enumerate(groups) if g.copies > 1]
    if not cands:
        return None
    loads = [groups[i].load(lengths, groups[i].copies - 1) for i in cands]
    engines = [groups[i].engine for i in cands]
    ok = _feasible(loads, engines, ctx)
    keep = [(i, ld, e) for i, ld, e, f in zip(cands, loads, engines, ok, strict=True) if f]
    if not keep:
        return None
    room = max_feasible_scale([ld for _, ld, _ in keep], [e for _, _, e in keep], ctx)
    i = keep[int(np.argmax(room))][0]
    out = list(groups)
    out[i] = replace(groups[i], copies=groups[i].copies - 1)
    return out


def _merge(groups: list[_Group], lengths: LengthModel, ctx: PlacementContext
           ) -> list[_Group] | None:
    """Two single-copy groups on one replica: the feasible merge with the most headroom."""
    single = [i for i, g in enumerate(groups) if g.copies == 1]
    if len(single) < 2:
        return None
    loads = [groups[i].load(lengths) for i in single]
    room = max_feasible_scale(loads, [groups[i].engine for i in single], ctx)
    pool = [single[k] for k in np.argsort(-room, kind="stable")[:MERGE_POOL]]
    pairs = list(itertools.combinations(sorted(pool), 2))
    merged = []
    for i, j in pairs:
        a, b = groups[i], groups[j]
        totals = dict(a.totals)
        for x, r in b.totals.items():
            totals[x] = totals.get(x, 0.0) + r
        merged.append(_Group(a.name, totals, {**a.ranks, **b.ranks}, a.engine, 1))
    optima = optimise([m.load(lengths) for m in merged], ctx, headroom=True)
    best = None
    for (i, j), m, opt in zip(pairs, merged, optima, strict=True):
        if opt.feasible and (best is None or (opt.headroom or 0.0) > best[0]):
            best = (opt.headroom or 0.0, i, j, replace(m, engine=opt.engine))
    if best is None:
        return None
    _, i, j, m = best
    return [m if k == i else g for k, g in enumerate(groups) if k != j]


def _as_plan(plan: Plan, groups: list[_Group], lengths: LengthModel, ctx: PlacementContext
             ) -> Plan:
    loads = [g.load(lengths) for g in groups]
    predicted = ctx.predictor.predict(loads, [g.engine for g in groups])
    out_groups = []
    routing: dict[str, list[Route]] = {}
    for g, load, pred in zip(groups, loads, predicted, strict=True):
        out_groups.append(ReplicaGroup(
            name=g.name,
            adapters=tuple(PlacedAdapter(a, int(r), float(q)) for a, r, q in
                           zip(load.adapter_ids, load.ranks, load.rates_rps, strict=True)),
            engine=g.engine, copies=g.copies, predicted=normalise_metrics(pred)))
    # each adapter's split between groups follows the traffic the groups now carry for it
    share: dict[str, dict[str, float]] = {}
    for g in groups:
        for a, r in g.totals.items():
            share.setdefault(a, {})[g.name] = r
    for a, per in share.items():
        total = sum(per.values())
        if total > 0:
            routing[a] = [Route(name, r / total) for name, r in per.items()]
        else:  # a silent adapter: split evenly between the groups that hold it
            routing[a] = [Route(name, 1.0 / len(per)) for name in per]
    return replace(plan, groups=tuple(out_groups), routing=routing)
