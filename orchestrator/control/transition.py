"""Safe transitions between two plans: make before break, one atomic routing swap, rollback.

``plan_transition`` (pure) maps the new plan's replicas onto the running ones: a running engine
whose engine config equals a new replica's is *re-targeted* (its adapter set changes, no restart;
pairs with the most adapters in common first), new replicas without such a partner are *started*,
running ones left over are *stopped*. ``execute`` then runs it through an ``Ops`` object (Ray
Serve in production, a fake in unit tests), in an order that never leaves a request without a
replica that holds its adapter:

1. start the new engines and wait until they are ready;
2. grow every re-targeted engine to the union of its old and new adapters;
3. publish the new routing table (one version bump: every ingress swaps it atomically) and wait
   until every ingress routes by it;
4. wait until no ingress has a request in flight that was routed by an older version;
5. shrink re-targeted engines to their new adapters, then stop the engines no longer needed.

A failure in 1-3 rolls back: started engines are stopped, grown ones get their old adapters back
and, if the new table was already published, the old one is published again. A failure in 4-5
cannot hurt traffic any more (the new table is live) and is reported, not rolled back.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.serving.routing import ReplicaId
from orchestrator.serving.spec import ReplicaSpec
from twin.config import EngineConfig


class TransitionError(RuntimeError):
    """A transition failed and was rolled back; the message says where and why."""


@dataclass(frozen=True)
class Member:
    """One running engine replica: its endpoint (Serve application), role and adapters."""

    endpoint: str
    rid: ReplicaId
    engine: EngineConfig
    adapters: frozenset[str]


@dataclass(frozen=True)
class Retarget:
    member: Member
    spec: ReplicaSpec  # what it serves after the transition

    @property
    def grown(self) -> frozenset[str]:
        return self.member.adapters | {a.id for a in self.spec.adapters}


@dataclass(frozen=True)
class Transition:
    retarget: tuple[Retarget, ...]
    start: tuple[tuple[str, ReplicaSpec], ...]  # (new endpoint, spec)
    stop: tuple[Member, ...]

    def summary(self) -> dict[str, int]:
        moved = sum(len({a.id for a in r.spec.adapters} - r.member.adapters)
                    for r in self.retarget)
        moved += sum(len(s.adapters) for _, s in self.start)
        return {"retargeted": len(self.retarget), "started": len(self.start),
                "stopped": len(self.stop), "adapters_placed_anew": moved}

    @property
    def members(self) -> tuple[Member, ...]:
        """The fleet after the transition."""
        kept = tuple(Member(r.member.endpoint, r.spec.replica_id, r.spec.engine,
                            frozenset(a.id for a in r.spec.adapters)) for r in self.retarget)
        new = tuple(Member(ep, s.replica_id, s.engine, frozenset(a.id for a in s.adapters))
                    for ep, s in self.start)
        return kept + new


def plan_transition(fleet: Sequence[Member], specs: Sequence[ReplicaSpec],
                    new_endpoint: Callable[[], str]) -> Transition:
    """Match running engines to the new replicas (module docstring)."""
    by_config: dict[EngineConfig, tuple[list[Member], list[ReplicaSpec]]] = {}
    for m in fleet:
        by_config.setdefault(m.engine, ([], []))[0].append(m)
    for s in specs:
        by_config.setdefault(s.engine, ([], []))[1].append(s)
    retarget: list[Retarget] = []
    start: list[tuple[str, ReplicaSpec]] = []
    stop: list[Member] = []
    for olds, news in by_config.values():
        pairs = sorted(
            ((len(m.adapters & {a.id for a in s.adapters}), i, j)
             for i, m in enumerate(olds) for j, s in enumerate(news)),
            key=lambda p: (-p[0], p[1], p[2]),
        )
        used_old: set[int] = set()
        used_new: set[int] = set()
        for _, i, j in pairs:
            if i not in used_old and j not in used_new:
                used_old.add(i)
                used_new.add(j)
                retarget.append(Retarget(olds[i], news[j]))
        start += [(new_endpoint(), s) for j, s in enumerate(news) if j not in used_new]
        stop += [m for i, m in enumerate(olds) if i not in used_old]
    return Transition(tuple(retarget), tuple(start), tuple(stop))


class Ops(Protocol):
    """What a transition does to the cluster (orchestrator/control/controller.py implements it)."""

    def start(self, items: Sequence[tuple[str, ReplicaSpec]], timeout_s: float) -> None:
        """Start these engines and wait until all are ready; raise naming the one that is not."""
        ...

    def assign(self, endpoint: str, spec: ReplicaSpec, adapter_ids: frozenset[str]) -> None:
        """Have ``endpoint`` serve ``adapter_ids`` in the role of ``spec``."""
        ...

    def publish(self, members: Sequence[Member], *, rollback: bool = False) -> int:
        """Publish the routing table over ``members`` (the new plan's, or with ``rollback`` the
        old plan's again); returns its version."""
        ...

    def wait_acked(self, version: int, timeout_s: float) -> None:
        """Wait until every ingress routes by ``version``; raise on timeout."""
        ...

    def wait_drained(self, version: int, timeout_s: float) -> None:
        """Wait until no ingress has a request in flight routed by an older version."""
        ...

    def stop(self, endpoints: Sequence[str]) -> None:
        ...


@dataclass
class Timeline:
    """Wall-clock seconds of each phase, for the closing report and ``lorafleet status``."""

    phases: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"phases": {k: round(v, 3) for k, v in self.phases.items()},
                "errors": list(self.errors)}


def execute(t: Transition, fleet: Sequence[Member], ops: Ops, *,
            roles: Mapping[str, ReplicaSpec], start_timeout_s: float, ack_timeout_s: float,
            drain_timeout_s: float) -> Timeline:
    """Run ``t`` from ``fleet`` (whose current specs are ``roles``, by endpoint; module
    docstring); raises TransitionError after a rollback."""
    line = Timeline()
    clock = time.perf_counter
    started: list[str] = []
    grown: list[Retarget] = []
    published = False

    def phase(name: str, t0: float) -> None:
        line.phases[name] = clock() - t0

    def rollback(where: str, exc: BaseException) -> TransitionError:
        """Undo steps independently: one failing must not keep the others from running."""
        undo: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
                undo.append(what)
            except Exception as again:  # report it; the operator must look
                undo.append(f"FAILED to {what}: {type(again).__name__}: {again}")

        if published:
            attempt("re-publish the old routing table",
                    lambda: ops.publish(fleet, rollback=True))
        for r in grown:
            attempt(f"restore {r.member.endpoint}'s adapters",
                    functools.partial(ops.assign, r.member.endpoint, roles[r.member.endpoint],
                                      r.member.adapters))
        if started:
            attempt(f"stop {len(started)} new engine(s)", lambda: ops.stop(started))
        return TransitionError(f"transition failed at {where}: {type(exc).__name__}: {exc}; "
                               f"rolled back: {'; '.join(undo) or 'nothing to undo'}")

    t0 = clock()
    try:
        started.extend(ep for ep, _ in t.start)
        if t.start:
            ops.start(t.start, start_timeout_s)
    except Exception as exc:
        raise rollback("start", exc) from exc
    phase("start_s", t0)
    t0 = clock()
    try:
        for r in t.retarget:
            if r.grown != r.member.adapters:
                grown.append(r)
                ops.assign(r.member.endpoint, roles[r.member.endpoint], r.grown)
    except Exception as exc:
        raise rollback("grow", exc) from exc
    phase("grow_s", t0)
    t0 = clock()
    try:
        published = True
        version = ops.publish(t.members)
        ops.wait_acked(version, ack_timeout_s)
    except Exception as exc:
        raise rollback("routing swap", exc) from exc
    phase("swap_s", t0)
    t0 = clock()
    try:
        ops.wait_drained(version, drain_timeout_s)
    except Exception as exc:
        line.errors.append(f"drain: {exc}")
    phase("drain_s", t0)
    t0 = clock()
    for r in t.retarget:
        try:
            ops.assign(r.member.endpoint, r.spec, frozenset(a.id for a in r.spec.adapters))
        except Exception as exc:
            line.errors.append(f"shrink {r.member.endpoint}: {exc}")
    if t.stop:
        try:
            ops.stop([m.endpoint for m in t.stop])
        except Exception as exc:
            line.errors.append(f"stop: {exc}")
    phase("retire_s", t0)
    return line
