"""The closed loop: a named, detached controller actor that keeps the deployment right.

Engine replicas push telemetry batches every second (``ingest``); ingress replicas poll for the
routing table four times a second (``routing_update``) and report what they still have in flight.
Every ``check_interval_s`` the controller (``ControllerCore.check``):

1. judges whether the telemetry is complete (every replica reported, the window covered); if not
   it does nothing - lost telemetry means "no re-plan", never a plan made on half the traffic;
2. estimates the live workload (orchestrator/workload_window.py) and detects drift against the
   workload the current plan was made for, plus the live-vs-predicted gap (orchestrator/drift.py);
3. on drift, builds candidate plans and verifies them and the current placement with twin runs
   fanned out as Ray tasks (orchestrator/replan.py, orchestrator/fanout.py), and applies the winner
   only if it beats the current plan by a margin that pays for the move;
4. applies a winner with a safe transition (orchestrator/transition.py).

``ControllerCore`` is plain Python over an ``Ops`` object, so unit tests drive it with fakes;
``ServeOps`` is the Ray Serve implementation and ``FleetController`` the Ray actor around both.
A restarted controller (Ray restarts the detached actor) rebuilds its state from the engine
replicas: each one holds the plan and routing version it was last assigned.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from orchestrator.adapter_registry import AdapterEntry, AdapterRegistry
from orchestrator.drift import DriftConfig, detect_drift, latest_change, replica_gaps
from orchestrator.replan import ReplanConfig, replan, rerate, whatif_workload
from orchestrator.replica import ReplicaSpec
from orchestrator.serving_spec import ServingSpec
from orchestrator.transition import (
    Member,
    Ops,
    Transition,
    TransitionError,
    execute,
    plan_transition,
)
from orchestrator.workload_window import TelemetryBatch, WorkloadWindow
from placement.plan import Plan
from placement.policy import PlacementContext
from twin.parallel import Mapper
from twin.workload import AdapterSpec, Workload

CONTROLLER_NAME = "lorafleet-controller"
NAMESPACE = "lorafleet"
ENGINE_APP_PREFIX = "lorafleet-e"
MAX_EVENTS = 200
DESCRIBE_TIMEOUT_S = 15.0
_GAP_KEYS = ("request_rate_rps", "total_throughput_tps", "ttft_mean_ms", "ttft_p50_ms")


class ControllerError(RuntimeError):
    """The controller cannot do what it was asked; the message says why."""


@dataclass(frozen=True)
class ControllerSettings:
    """The loop's knobs; defaults suit a real fleet, tests shrink the windows."""

    window_s: float = 60.0
    min_span_s: float = 20.0  # evidence needed after a (re)start before judging drift
    min_requests: int = 50  # an idle fleet keeps its plan: no re-plan on (almost) no traffic
    check_interval_s: float = 5.0
    gap_interval_s: float = 30.0
    verify_window_s: float = 600.0  # simulated seconds per twin verification run
    predictor: str | None = None  # default: the predictor the deployed plan was made with
    auto_apply: bool = True
    replan_cooldown_s: float = 60.0  # after a re-plan that changed nothing, for the same reasons
    start_timeout_s: float = 900.0
    ack_timeout_s: float = 30.0
    drain_timeout_s: float = 300.0
    fanout_batch: int = 1
    fanout_cpus: float = 0.5
    # a re-plan after a step in the load rests on the few seconds since it, N requests: the
    # fleet is sized for the estimate + this many Poisson sds (x (1 + k / sqrt(N))), so a low
    # draw does not leave it a replica short (a later check only re-plans for a 20 % miss)
    step_margin_sd: float = 1.0
    drift: DriftConfig = field(default_factory=DriftConfig)
    replan: ReplanConfig = field(default_factory=ReplanConfig)

    def __post_init__(self) -> None:
        for name in ("window_s", "check_interval_s", "gap_interval_s", "verify_window_s",
                     "start_timeout_s", "ack_timeout_s", "drain_timeout_s", "fanout_cpus"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"controller.{name}: must be a positive number, got {v!r}")
        if not isinstance(self.step_margin_sd, int | float) or not (
                math.isfinite(self.step_margin_sd) and self.step_margin_sd >= 0):
            raise ValueError(f"controller.step_margin_sd: must be a number >= 0, got "
                             f"{self.step_margin_sd!r}")
        if not 0 <= self.min_span_s <= self.window_s:
            raise ValueError(f"controller.min_span_s: must be within [0, window_s], "
                             f"got {self.min_span_s}")


def planned_workload(plan: Plan) -> Workload:
    """The per-adapter workload a plan was made for (rates summed over groups and copies)."""
    rates: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for g in plan.groups:
        for a in g.adapters:
            rates[a.id] = rates.get(a.id, 0.0) + a.rate_rps * g.copies
            ranks[a.id] = a.rank
    return Workload(plan.workload.name, tuple(AdapterSpec(a, ranks[a], rates[a]) for a in rates),
                    plan.workload.length_model())


def routing_of(plan: Plan, members: Sequence[Member], base_model: str) -> dict[str, Any]:
    """The routing table the ingresses install: the plan's routes + which endpoint is which
    copy. Members whose group is not in ``plan`` are ignored (a rollback passes the old fleet)."""
    copies = {g.name: g.copies for g in plan.groups}
    endpoints = {str(m.rid): m.endpoint for m in members if m.rid.group in copies}
    missing = [f"{g}/{c}" for g, n in copies.items() for c in range(n)
               if f"{g}/{c}" not in endpoints]
    if missing:
        raise ValueError(f"routing: no running engine for replica(s) {missing}")
    return {"routes": {a: [[r.group, float(r.weight)] for r in rs]
                       for a, rs in plan.routing.items()},
            "copies": copies, "base_model": base_model, "endpoints": endpoints}


class FleetOps(Ops):
    """Cluster actions beyond a transition's: find running engines, (re)deploy the ingress."""

    def describe(self) -> list[dict[str, Any]]:
        """Every running engine's ``describe()`` (recovery after a controller restart)."""
        ...

    def deploy_ingress(self, routing: Mapping[str, Any]) -> None:
        ...

    def stamp(self, endpoints: Sequence[str], stamp: Mapping[str, Any]) -> None:
        """Record on each engine the plan, routing version and fleet it now serves under."""
        ...

    def delete_ingress(self) -> None:
        ...


class ControllerCore:
    """The controller's state and decisions (module docstring); thread-safe where it must be:
    ``ingest``/``routing_update`` run on the actor's event loop while ``check`` runs in a
    worker thread."""

    def __init__(self, serving: ServingSpec, settings: ControllerSettings, ops: FleetOps,
                 ctx: PlacementContext, mapper: Mapper | None = None,
                 clock: Callable[[], float] = time.time, replan_off: str | None = None) -> None:
        from placement.verify import verify_plans

        self.serving = serving
        self.settings = settings
        self.replan_off = replan_off
        self.ops = ops
        self.ctx = ctx
        self.clock = clock
        self.verify = functools.partial(verify_plans, profile=ctx.profile,
                                        duration_s=settings.verify_window_s, mapper=mapper)
        self.lock = threading.Lock()
        self.busy = threading.Lock()  # one check/transition at a time
        self.window = WorkloadWindow(settings.window_s, min_span_s=settings.min_span_s)
        self.plan: Plan = serving.plan
        self.members: dict[str, Member] = {}
        self.roles: dict[str, ReplicaSpec] = {}
        self.registry: AdapterRegistry = serving.registry
        self.registered_later: set[str] = set()
        self.version = 0
        self.routing: dict[str, Any] = {}
        self.acks: dict[str, tuple[float, dict[str, Any]]] = {}
        self.since = clock()
        self.events: list[dict[str, Any]] = []
        self.last_check: dict[str, Any] = {}
        self.gaps: dict[str, Any] = {}
        self._gap_at = -math.inf
        self._quiet_until = -math.inf
        self._quiet_workload: Workload | None = None
        self._serial = itertools.count()

    # -- events -------------------------------------------------------------------------------
    def event(self, kind: str, **details: Any) -> dict[str, Any]:
        e = {"t": self.clock(), "kind": kind, **details}
        with self.lock:
            self.events.append(e)
            del self.events[:-MAX_EVENTS]
        return e

    # -- start / recover ---------------------------------------------------------------------
    def bootstrap(self) -> dict[str, Any]:
        """Adopt running engines (a restarted controller) or deploy the plan from scratch."""
        found = self.ops.describe()
        if found:
            return self._recover(found)
        specs = self.serving.replica_specs()
        items = [(self._new_endpoint(), s) for s in specs]
        t0 = time.perf_counter()
        self.ops.start(items, self.settings.start_timeout_s)
        members = [Member(ep, s.replica_id, s.engine, frozenset(a.id for a in s.adapters))
                   for ep, s in items]
        self._install(self.plan, members, dict(items))
        self.ops.deploy_ingress(self._publish(self.plan, members))
        self.ops.wait_acked(self.version, self.settings.ack_timeout_s)
        self._stamp()
        with self.lock:
            self.since = self.clock()  # judge traffic from when the ingress could send it
        self.event("deployed", replicas=len(items), seconds=round(time.perf_counter() - t0, 2))
        return self.status()

    def _recover(self, found: list[dict[str, Any]]) -> dict[str, Any]:
        """The fleet of the newest stamp: its plan, and which endpoint is which replica. An
        engine Serve replaced after a crash carries no stamp but is still a member; running
        engines the stamp does not name are leftovers of an unfinished transition."""
        newest = max(found, key=lambda d: d["version"])
        if not newest["version"]:
            raise RuntimeError(
                f"{len(found)} engine application(s) run but none was stamped with a plan (the "
                "controller died while deploying); run `lorafleet shutdown` and deploy again")
        plan = Plan.from_dict(newest["plan"])
        # adapters registered after the deploy: the plan may place them, the deploy's registry
        # does not know them
        later = [AdapterEntry(**e) for e in newest.get("registered", [])]
        self.registry = replace(self.registry,
                                entries={**self.registry.entries, **{e.id: e for e in later}})
        self.registered_later = {e.id for e in later}
        specs = {str(s.replica_id): s
                 for s in self.serving.with_(plan=plan, registry=self.registry).replica_specs()}
        endpoints: dict[str, str] = dict(newest["endpoints"])
        members = [Member(ep, specs[rid].replica_id, specs[rid].engine,
                          frozenset(a.id for a in specs[rid].adapters))
                   for rid, ep in endpoints.items()]
        roles = {ep: specs[rid] for rid, ep in endpoints.items()}
        stale = sorted({d["endpoint"] for d in found} - set(endpoints.values()))
        self.version = int(newest["version"])
        self._install(plan, members, roles)
        self.routing = {**routing_of(plan, members, self.serving.base_model_name),
                        "version": self.version}
        if stale:
            self.ops.stop(stale)
        self.event("recovered", replicas=len(members), version=self.version, stopped=stale)
        return self.status()

    def _stamp(self) -> None:
        """Record the plan, version and fleet on every engine (what a restarted controller
        recovers from)."""
        with self.lock:
            stamp = {"version": self.version, "plan": self.plan.to_dict(),
                     "endpoints": {str(m.rid): ep for ep, m in self.members.items()},
                     "registered": [asdict(self.registry.get(a))
                                    for a in sorted(self.registered_later)]}
            endpoints = list(self.members)
        self.ops.stamp(endpoints, stamp)

    def _new_endpoint(self) -> str:
        return f"{ENGINE_APP_PREFIX}{int(self.clock() * 1000) % 10**9:09d}-{next(self._serial)}"

    def _install(self, plan: Plan, members: Sequence[Member],
                 roles: Mapping[str, ReplicaSpec]) -> None:
        with self.lock:
            gone = set(self.members) - {m.endpoint for m in members}
            self.plan = plan
            self.members = {m.endpoint: m for m in members}
            self.roles = {m.endpoint: roles[m.endpoint] for m in members}
            self.since = self.clock()
            for ep in gone:
                self.window.forget(ep)

    def _publish(self, plan: Plan, members: Sequence[Member]) -> dict[str, Any]:
        routing = routing_of(plan, members, self.serving.base_model_name)
        with self.lock:
            self.version += 1
            self.routing = {**routing, "version": self.version}
            return self.routing

    # -- what replicas call -------------------------------------------------------------------
    def ingest(self, batch: Mapping[str, Any]) -> None:
        b = TelemetryBatch.from_dict(batch)
        with self.lock:
            if b.replica in self.members:
                self.window.add(b)

    def routing_update(self, ingress: str, state: Mapping[str, Any]) -> dict[str, Any] | None:
        """An ingress's poll: record its drain state; the table if it is behind."""
        with self.lock:
            self.acks[ingress] = (self.clock(), dict(state))
            if self.routing and int(state.get("version", 0)) < self.routing["version"]:
                return self.routing
            return None

    def fresh_acks(self, max_age_s: float = 3.0) -> list[dict[str, Any]]:
        now = self.clock()
        with self.lock:
            return [s for t, s in self.acks.values() if now - t <= max_age_s]

    # -- the loop body ------------------------------------------------------------------------
    def estimate(self, now: float) -> tuple[Workload | None, dict[str, Any]]:
        """The live workload, or None with the reason when the telemetry is incomplete."""
        ranks = {a.id: a.rank for a in self._registered()}
        cfg = self.settings.drift
        with self.lock:
            cov = self.window.coverage(now, list(self.members), since=self.since)
            if not cov.complete:
                return None, {"telemetry": "incomplete", "why": cov.why}
            # a step in the load inside the window: estimate from the traffic after it
            bins = self.window.binned_counts(now, bin_s=cfg.change_bin_s, since=self.since)
            k = latest_change(bins, cfg)
            since = self.since if k is None else now - (len(bins) - k) * cfg.change_bin_s
            est = self.window.estimate(now, ranks=ranks, lengths=self.plan.workload.length_model(),
                                       since=since)
            unknown = self.window.unknown_ids(now, ranks, since=since)
        seen: dict[str, Any] = {"telemetry": "complete",
                                "span_s": round(min(cov.span_s, now - since), 1),
                                "unknown_ids": sorted(unknown)[:20]}
        if k is not None:
            seen["changed_s_ago"] = round(now - since, 1)
        return est, seen

    def _registered(self) -> list[AdapterEntry]:
        placed = {a.id for g in self.plan.groups for a in g.adapters}
        ids = sorted(placed | self.registered_later)
        return [self.registry.get(a) for a in ids]

    def check(self) -> dict[str, Any]:
        """One pass of the loop (module docstring); returns what it saw and did."""
        if not self.busy.acquire(blocking=False):
            return {"skipped": "a check or transition is already running"}
        try:
            return self._check()
        finally:
            self.busy.release()

    def heal(self) -> list[str]:
        """Re-assign replicas whose adapters differ from their role: Serve replaced a dead
        replica, and the replacement came up with the adapters it was first deployed with."""
        with self.lock:
            wrong = []
            for ep, m in self.members.items():
                b = self.window.latest(ep)
                if (b is not None and b.t_start >= self.since
                        and frozenset(b.adapters_held) != m.adapters):
                    wrong.append(ep)
        for ep in wrong:
            self.ops.assign(ep, self.roles[ep], self.members[ep].adapters)
            self.event("reassigned", endpoint=ep, replica=str(self.members[ep].rid))
        return wrong

    def _check(self) -> dict[str, Any]:
        now = self.clock()
        healed = self.heal()
        est, seen = self.estimate(now)
        record: dict[str, Any] = {"t": now, **seen, **({"healed": healed} if healed else {})}
        if est is None:
            self.last_check = record
            return record
        if now - self._gap_at >= self.settings.gap_interval_s:
            self.gaps = self.live_vs_predicted(est, now)
            self._gap_at = now
        planned = planned_workload(self.plan)
        placed = {a.id for a in planned.adapters}
        span = max(seen["span_s"], 1e-3)  # the seconds the estimate rests on
        drift = detect_drift(
            planned, est, span, self.settings.drift,
            registered_unplaced=sorted(self.registered_later - placed),
            gaps=self.gaps.get("gaps", {}),
        )
        record["drift"] = list(drift.reasons)
        arrived = (est.total_rate_rps + est.base_model_rate_rps) * seen["span_s"]
        if drift.drifted and arrived < self.settings.min_requests:
            record["decision"] = (f"only {arrived:.0f} requests in the window (need "
                                  f"{self.settings.min_requests}): too little traffic to re-plan")
            self.last_check = record
            return record
        if not drift.drifted:
            self.last_check = record
            return record
        if now < self._quiet_until and self._quiet_workload is not None and not detect_drift(
                self._quiet_workload, est, span,
                self.settings.drift).drifted:
            record["decision"] = ("cooling down: the workload has not moved since the last "
                                  "re-plan, which kept the plan")
            self.last_check = record
            return record
        if self.replan_off:
            record["decision"] = self.replan_off
            self.last_check = record
            return record
        detected = self.event("drift", reasons=list(drift.reasons))
        target, sized = est, {}
        if "changed_s_ago" in seen and arrived > 0:
            margin = 1.0 + self.settings.step_margin_sd / math.sqrt(arrived)
            target, sized = est.scaled(margin), {"step_margin": round(margin, 4)}
        record.update(sized)
        decision = replan(target, self.ctx, self.plan, self.settings.replan, self.verify)
        record["decision"] = decision.reason
        self.event("replan", apply=decision.apply, reason=decision.reason,
                   seconds=round(decision.wall_s, 3), timings=decision.timings,
                   replicas=decision.plan.replicas if decision.plan else None, **sized)
        if decision.apply and decision.plan is not None and self.settings.auto_apply:
            record["transition"] = self.apply(decision.plan, detected_at=detected["t"])
        elif not decision.apply:
            self._quiet_until = now + self.settings.replan_cooldown_s
            self._quiet_workload = est
        self.last_check = record
        return record

    def live_vs_predicted(self, est: Workload, now: float) -> dict[str, Any]:
        """Per replica: live figures vs the twin's for the observed workload on this placement."""
        current = rerate(self.plan, est)
        if current is None:
            return {"t": now, "why": "the live workload has adapters the plan does not place"}
        verified = self.verify([current])[0]
        with self.lock:
            live = {ep: self.window.live_metrics(now, ep, since=self.since)
                    for ep in self.members}
            members = dict(self.members)
        gaps: dict[str, float] = {}
        replicas: dict[str, Any] = {}
        for ep, m in sorted(members.items(), key=lambda kv: kv[1].rid):
            pred = dict(verified.group(m.rid.group).verified or {})
            g = replica_gaps(str(m.rid), live[ep], pred)
            gaps.update(g)
            replicas[str(m.rid)] = {
                "endpoint": ep,
                "live": {k: live[ep].get(k) for k in _GAP_KEYS},
                "predicted": {k: pred.get(k) for k in _GAP_KEYS},
                "gap": {k.split(" ", 1)[1]: round(v, 4) for k, v in g.items()},
            }
        return {"t": now, "twin_window_s": self.settings.verify_window_s,
                "replicas": replicas, "gaps": gaps}

    # -- applying a plan ----------------------------------------------------------------------
    def apply(self, plan: Plan, *, detected_at: float | None = None) -> dict[str, Any]:
        """Move the fleet to ``plan`` safely (orchestrator/transition.py); returns the timeline."""
        t0 = self.clock()
        specs = self.serving.with_(plan=plan, registry=self.registry).replica_specs()
        old_members = list(self.members.values())
        t: Transition = plan_transition(old_members, specs, self._new_endpoint)
        old_routing = routing_of(self.plan, old_members, self.serving.base_model_name)
        ops = _Publishing(self, plan, old_routing)
        try:
            line = execute(t, old_members, ops, roles=dict(self.roles),
                           start_timeout_s=self.settings.start_timeout_s,
                           ack_timeout_s=self.settings.ack_timeout_s,
                           drain_timeout_s=self.settings.drain_timeout_s)
        except TransitionError as exc:
            self.event("transition_failed", error=str(exc))
            return {"ok": False, "error": str(exc)}
        roles = {**{r.member.endpoint: r.spec for r in t.retarget}, **dict(t.start)}
        self._install(plan, t.members, roles)
        try:
            self._stamp()
        except Exception as exc:  # serving is fine; only a controller restart would suffer
            line.errors.append(f"stamp: {exc}")
        self._gap_at = -math.inf
        summary = {"ok": True, **t.summary(), **line.to_dict(), "version": self.version,
                   "replicas": plan.replicas, "seconds": round(self.clock() - t0, 3)}
        if detected_at is not None:
            summary["since_detection_s"] = round(self.clock() - detected_at, 3)
        self.event("transition", **summary)
        return summary

    def apply_exclusive(self, plan: Plan) -> dict[str, Any]:
        """``apply`` for an operator's plan: waits for a running check or transition first."""
        with self.busy:
            return self.apply(plan)

    # -- operator requests --------------------------------------------------------------------
    def register(self, entries: Sequence[AdapterEntry]) -> list[str]:
        """New adapters the next re-plan must place (drift: "new adapters registered")."""
        merged = dict(self.registry.entries)
        clash = [e.id for e in entries if e.id in merged and merged[e.id] != e]
        if clash:
            raise ValueError(f"adapter(s) already registered with another rank/source: {clash}")
        merged.update({e.id: e for e in entries})
        self.registry = replace(self.registry, entries=merged)
        self.registered_later |= {e.id for e in entries}
        self._stamp()  # a restarted controller must still know them
        self.event("registered", adapters=[e.id for e in entries])
        return sorted(self.registered_later)

    def whatif(self, *, rate_scale: float = 1.0, add: Sequence[AdapterSpec] = (),
               remove: Sequence[str] = ()) -> dict[str, Any]:
        """A plan for the live workload changed as asked, with its twin figures; not applied."""
        if self.replan_off:
            raise ControllerError(self.replan_off)
        est, seen = self.estimate(self.clock())
        if est is None:
            raise ControllerError(f"no live workload estimate yet: {seen['why']}")
        changed = whatif_workload(est, rate_scale=rate_scale, add=add, remove=remove)
        decision = replan(changed, self.ctx, self.plan if not (add or remove) else None,
                          self.settings.replan, self.verify)
        plan = decision.plan
        return {"workload": {"adapters": len(changed.adapters),
                             "total_rate_rps": changed.total_rate_rps},
                "current_replicas": self.plan.replicas,
                "replicas": plan.replicas if plan else None,
                "would_apply": decision.apply, "reason": decision.reason,
                "plan": plan.to_dict() if plan else None}

    def status(self, n_events: int = 30) -> dict[str, Any]:
        with self.lock:
            return {
                "version": self.version, "replicas": self.plan.replicas,
                "replanning": self.replan_off or "on",
                "busy": self.busy.locked(),  # a check, re-plan or transition is running
                "groups": {g.name: {"copies": g.copies, "adapters": len(g.adapters)}
                           for g in self.plan.groups},
                "members": {ep: {"replica": str(m.rid), "adapters": len(m.adapters)}
                            for ep, m in self.members.items()},
                "ingresses": sum(1 for t, _ in self.acks.values() if self.clock() - t <= 3.0),
                "last_check": self.last_check,
                "plan": self.plan.to_dict(),
                "live_vs_predicted": self.gaps, "events": self.events[-n_events:],
                "settings": _plain(asdict(self.settings)),
            }

    def shutdown(self) -> None:
        self.ops.delete_ingress()
        self.ops.stop(list(self.members))


class _Publishing:
    """The transition's Ops: the cluster's, with ``publish`` bound to the plans involved."""

    def __init__(self, core: ControllerCore, plan: Plan, old_routing: Mapping[str, Any]) -> None:
        self.core, self.plan, self.old_routing = core, plan, old_routing
        self.start = core.ops.start
        self.stop = core.ops.stop
        self.wait_acked = core.ops.wait_acked
        self.wait_drained = core.ops.wait_drained

    def assign(self, endpoint: str, spec: ReplicaSpec, adapter_ids: frozenset[str]) -> None:
        self.core.ops.assign(endpoint, spec, adapter_ids)

    def publish(self, members: Sequence[Member], *, rollback: bool = False) -> int:
        if not rollback:
            self.core._publish(self.plan, members)
        else:  # the old table again, under a new version number
            with self.core.lock:
                self.core.version += 1
                self.core.routing = {**self.old_routing, "version": self.core.version}
        return self.core.version


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Ray Serve side
# --------------------------------------------------------------------------------------------


class ServeOps(FleetOps):
    """``FleetOps`` on Ray Serve: one Serve application per engine replica (its endpoint)."""

    def __init__(self, core_ref: Callable[[], ControllerCore], serving: ServingSpec,
                 controller: tuple[str, str], poll_s: float = 0.25) -> None:
        self.core_ref = core_ref
        self.serving = serving
        self.controller = controller
        self.poll_s = poll_s

    def _handle(self, endpoint: str) -> Any:
        from ray import serve

        from orchestrator.serve_app import ENGINE_DEPLOYMENT

        return serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=endpoint)

    def describe(self) -> list[dict[str, Any]]:
        from ray import serve

        apps = [n for n in serve.status().applications if n.startswith(ENGINE_APP_PREFIX)]
        calls = {name: self._handle(name).describe.remote() for name in apps}
        out = []
        for name, call in calls.items():
            try:
                out.append(call.result(timeout_s=DESCRIBE_TIMEOUT_S))
            except Exception:  # being replaced by Serve right now: the stamps of the others
                out.append({"endpoint": name, "version": 0})  # still name it if it belongs
        return out

    def start(self, items: Sequence[tuple[str, ReplicaSpec]], timeout_s: float) -> None:
        from ray import serve

        from orchestrator.serve_app import engine_app

        for endpoint, spec in items:
            app = engine_app(self.serving, spec, endpoint, self.controller)
            serve._run(app, _blocking=False, name=endpoint, route_prefix=None)
        self._wait_running([ep for ep, _ in items], timeout_s)

    def _wait_running(self, names: Sequence[str], timeout_s: float) -> None:
        from ray import serve

        from orchestrator.deploy import deployment_messages

        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            apps = serve.status().applications
            for n in list(pending):
                st = str(apps[n].status) if n in apps else "MISSING"
                if st.endswith("RUNNING"):
                    pending.discard(n)
                elif st.endswith(("DEPLOY_FAILED", "UNHEALTHY")):
                    raise RuntimeError(f"engine {n} failed to start: {apps[n].message[-800:]}\n"
                                       f"{deployment_messages(n)}")
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"engine(s) {sorted(pending)} not ready after {timeout_s:g} s")
            if pending:
                time.sleep(self.poll_s)

    def assign(self, endpoint: str, spec: ReplicaSpec, adapter_ids: frozenset[str]) -> None:
        core = self.core_ref()
        adapters = core.registry.subset(sorted(adapter_ids))
        role = {"group": spec.group, "copy": spec.copy, "predicted": dict(spec.predicted)}
        self._handle(endpoint).assign.remote(role, adapters).result(timeout_s=120)

    def stamp(self, endpoints: Sequence[str], stamp: Mapping[str, Any]) -> None:
        calls = [self._handle(ep).stamp.remote(dict(stamp)) for ep in endpoints]
        for c in calls:
            c.result(timeout_s=60)

    def publish(self, members: Sequence[Member], *, rollback: bool = False) -> int:
        raise NotImplementedError("the controller publishes (ControllerCore._publish)")

    def wait_acked(self, version: int, timeout_s: float) -> None:
        self._wait(lambda s: int(s.get("version", 0)) >= version, timeout_s,
                   f"every ingress to route by version {version}")

    def wait_drained(self, version: int, timeout_s: float) -> None:
        self._wait(lambda s: int(s.get("version", 0)) >= version
                   and int(s.get("old_in_flight", 0)) == 0, timeout_s,
                   f"requests routed before version {version} to finish")

    def _wait(self, ok: Callable[[Mapping[str, Any]], bool], timeout_s: float, what: str) -> None:
        core = self.core_ref()
        need = self.serving.ingress_replicas
        deadline = time.monotonic() + timeout_s
        while True:
            acks = core.fresh_acks()
            if len(acks) >= need and all(ok(s) for s in acks):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:g} s for {what} "
                                   f"({len(acks)} of {need} ingress(es) polling)")
            time.sleep(self.poll_s)

    def stop(self, endpoints: Sequence[str]) -> None:
        from ray import serve

        for ep in endpoints:
            serve.delete(ep, _blocking=False)

    def deploy_ingress(self, routing: Mapping[str, Any]) -> None:
        from ray import serve

        from orchestrator.serve_app import APP_NAME, managed_ingress_app

        serve.run(managed_ingress_app(self.serving, routing, self.controller), name=APP_NAME,
                  route_prefix="/", blocking=False)

    def delete_ingress(self) -> None:
        from ray import serve

        from orchestrator.serve_app import APP_NAME

        serve.delete(APP_NAME)


def placement_context(serving: ServingSpec, predictor: str | None
                      ) -> tuple[PlacementContext, str | None]:
    """The context re-plans use: the deployed plan's profile, predictor and settings; plus why
    re-planning is off (a hand-made plan names no predictor and none was given), else None.
    With re-planning off the controller still estimates, detects drift and reports the gap."""
    from placement.predictors import PREDICTORS, make_predictor
    from twin.profile import load_profile

    plan = serving.plan
    profile = load_profile(plan.profile.name)
    name = predictor or plan.predictor
    off = None
    if name not in PREDICTORS:
        off = (f"re-planning is off: the plan was made with predictor {name!r}; deploy with "
               f"--predictor ({'|'.join(PREDICTORS)}) to let the controller re-plan")
        name = "analytic"  # only for the context's shape; never used to plan
    known = {"min_served_fraction", "target_utilisation", "max_num_seqs",
             "max_num_batched_tokens"}
    kw = {k: v for k, v in plan.settings.items() if k in known}
    return PlacementContext.for_profile(profile, make_predictor(name, profile), **kw), off


def controller_actor_class() -> Any:
    """The Ray actor class (defined lazily: importing this module needs no Ray)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=64)
    class FleetController:
        """Named, detached; wraps ControllerCore and runs its loop."""

        def __init__(self, serving: ServingSpec, settings: ControllerSettings,
                     name: str = CONTROLLER_NAME, namespace: str = NAMESPACE) -> None:
            from orchestrator.fanout import ray_map

            ops = ServeOps(lambda: self.core, serving, (name, namespace))
            mapper = ray_map(batch_size=settings.fanout_batch, num_cpus=settings.fanout_cpus)
            ctx, off = placement_context(serving, settings.predictor)
            self.core = ControllerCore(serving, settings, ops, ctx, mapper, replan_off=off)
            self.loop_task: asyncio.Task | None = None
            import ray

            # Ray restarted us after a crash: recover from the replicas on the first call
            self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed

        async def bootstrap(self) -> dict[str, Any]:
            out = await asyncio.to_thread(self.core.bootstrap)
            self._start_loop()
            return out

        def _start_loop(self) -> None:
            if self.loop_task is None:
                self.loop_task = asyncio.get_running_loop().create_task(self._loop())

        def _ensure_started(self) -> None:
            if self.reconstructed and self.loop_task is None:
                self.loop_task = asyncio.get_running_loop().create_task(self._recover())

        async def _recover(self) -> None:
            try:
                await asyncio.to_thread(self.core.bootstrap)
            except Exception as exc:
                self.core.event("recover_failed", error=f"{type(exc).__name__}: {exc}")
            await self._loop()

        async def _loop(self) -> None:
            while True:
                await asyncio.sleep(self.core.settings.check_interval_s)
                try:
                    await asyncio.to_thread(self.core.check)
                except Exception as exc:  # keep looping; the event says what broke
                    self.core.event("check_failed", error=f"{type(exc).__name__}: {exc}")

        async def ingest(self, batch: dict[str, Any]) -> None:
            self._ensure_started()
            self.core.ingest(batch)

        async def routing_update(self, ingress: str, state: dict[str, Any]) -> Any:
            self._ensure_started()
            return self.core.routing_update(ingress, state)

        async def role(self, endpoint: str) -> ReplicaSpec | None:
            return self.core.roles.get(endpoint)

        async def check(self) -> dict[str, Any]:
            return await asyncio.to_thread(self.core.check)

        async def status(self, n_events: int = 30) -> dict[str, Any]:
            return self.core.status(n_events)

        async def whatif(self, **kw: Any) -> dict[str, Any]:
            return await asyncio.to_thread(functools.partial(self.core.whatif, **kw))

        async def register(self, entries: list[AdapterEntry]) -> list[str]:
            return await asyncio.to_thread(self.core.register, entries)  # stamps the engines

        async def apply_plan(self, plan: dict[str, Any]) -> dict[str, Any]:
            return await asyncio.to_thread(self.core.apply_exclusive, Plan.from_dict(plan))

        async def shutdown(self) -> None:
            if self.loop_task is not None:
                self.loop_task.cancel()
            await asyncio.to_thread(self.core.shutdown)

    return FleetController


def start_controller(serving: ServingSpec, settings: ControllerSettings, *,
                     name: str = CONTROLLER_NAME, timeout_s: float = 1800.0) -> Any:
    """Create the detached controller (or find the running one) and bootstrap the fleet."""
    import ray

    cls = controller_actor_class()
    actor = cls.options(name=name, namespace=NAMESPACE, lifetime="detached",
                        get_if_exists=True).remote(serving, settings, name, NAMESPACE)
    ray.get(actor.bootstrap.remote(), timeout=timeout_s)
    return actor


def get_controller(name: str = CONTROLLER_NAME) -> Any:
    import ray

    return ray.get_actor(name, namespace=NAMESPACE)
