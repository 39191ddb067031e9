"""The closed loop's state and decisions (Ray-free; the Ray actor is control/actor.py).

Ingress replicas count every client request once, where it is offered, and push those arrivals
every second (``ingest_offered``); engine replicas push what they served - completions, TTFT,
their queue, the adapters they hold (``ingest``); ingresses poll for the routing table four
times a second (``routing_update``) and report what they still have in flight. Every
``check_interval_s`` the controller (``ControllerCore.check``):

1. judges whether the telemetry is complete (every ingress and engine reported, the window
   covered, enough seconds since the last transition); if not it does nothing - lost telemetry
   means "no re-plan", never a plan made on half the traffic;
2. estimates the offered workload from the ingresses' arrivals (control/window.py), from the
   traffic after the last step in the load if there was one, and compares it with the workload
   the current plan was made for (control/drift.py);
3. weighs the evidence of capacity: the estimate exceeds what the predictor says the fleet
   serves, or an engine's queue grows. A live throughput or TTFT below the twin's with no
   growing queue is a calibration gap, reported as such, never a reason to add replicas;
4. on drift or missing capacity, builds candidate plans for the estimate (not more), verifies
   them and the current placement with twin runs fanned out as Ray tasks (control/replan.py,
   control/fanout.py; a cluster with no CPU for them runs them here), and applies the winner
   only if it beats the current plan by a margin that pays for the move;
5. applies a winner with a safe transition (control/transition.py).

``ControllerCore`` is plain Python over a ``FleetOps`` object, so unit tests drive it with
fakes; ``control.actor.ServeOps`` is the Ray Serve implementation and its ``FleetController``
the actor around both. A restarted controller rebuilds its state from the engine replicas: each
one holds the plan and routing version it was last assigned; the event history is kept in
Ray's key-value store.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from orchestrator.control.calibration import CalibrationConfig, OnlineCalibration
from orchestrator.control.drift import (
    DriftConfig,
    calibration_notes,
    detect_drift,
    latest_change,
    queue_growth,
    replica_gaps,
    unsettled,
)
from orchestrator.control.replan import ReplanConfig, replan, rerate, whatif_workload
from orchestrator.control.transition import (
    Member,
    Ops,
    Transition,
    TransitionError,
    execute,
    plan_transition,
)
from orchestrator.control.window import Coverage, TelemetryBatch, WorkloadWindow
from orchestrator.serving.registry import AdapterEntry, AdapterRegistry
from orchestrator.serving.spec import ReplicaSpec, ServingSpec
from placement.context import PlacementContext
from placement.plan import Plan
from placement.replica_optimum import is_feasible, max_feasible_scale
from placement.verify import verify_plans
from twin.parallel import Mapper
from twin.replica import ReplicaLoad
from twin.workload import AdapterSpec, Workload

CONTROLLER_NAME = "lorafleet-controller"
NAMESPACE = "lorafleet"
ENGINE_APP_PREFIX = "lorafleet-e"
MAX_EVENTS = 200
MAX_CHECKS = 1000  # check records kept for ``history`` (the benchmark's timeline)
DESCRIBE_TIMEOUT_S = 15.0
RECOVER_RETRY_S = (2.0, 30.0)  # first and longest wait between recovery attempts
MIN_CAPACITY_FACTOR = 0.25  # queue evidence never makes plans assume less of the twin's capacity
CAPACITY_EVIDENCE_SHARE = 0.95  # a saturated replica finishing less of the twin's capacity lacks it
_GAP_KEYS = ("request_rate_rps", "total_throughput_tps", "ttft_mean_ms", "ttft_p50_ms",
             "itl_mean_ms", "finished", "waiting", "failed")


class ControllerError(RuntimeError):
    """The controller cannot do what it was asked; the message says why."""


class RecoverLater(RuntimeError):
    """A restarted controller could not read the fleet yet (engines did not answer)."""


WHATIF_WAIT_S = 300.0  # how long a what-if waits for a running re-plan or transition

@dataclass(frozen=True)
class ControllerSettings:
    """The loop's knobs; defaults suit a real fleet, tests shrink the windows."""

    window_s: float = 60.0
    min_span_s: float = 20.0  # evidence needed after a (re)start before judging drift
    min_requests: int = 50  # an idle fleet keeps its plan: no re-plan on (almost) no traffic
    # a decision on part of the window (the traffic since a step) waits for this many requests:
    # the fleet is sized for the estimate, whose relative error is ~1/sqrt(N) (5 % here)
    decide_requests: int = 400
    decide_min_s: float = 10.0  # ... over at least this many seconds (a burst lasts a few)
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
    # one CPU per twin task: at most as many tasks as CPUs, so Ray keeps their workers warm
    # (fractional tasks run more workers than CPUs, which Ray reaps and restarts every fan-out:
    # seconds of CPU each on a small host, stalling the serving path)
    fanout_cpus: float = 1.0
    twin_stall_s: float = 60.0  # no twin task finished for this long: run the rest here
    # "the fleet does not serve the estimate" is judged at the estimate's lower confidence
    # bound (this many Poisson sds below it), so noise around a plan sized at the edge does not
    # scale the fleet up and down
    shortfall_z: float = 2.0
    # an engine queue that grows lowers the capacity plans assume to what that replica served
    # (at most by half); held this long after the last such evidence
    capacity_hold_s: float = 600.0
    # queue evidence rests on this much of the current fleet's telemetry at least
    queue_min_s: float = 30.0
    # after a transition, its first seconds are not judged (``ControllerCore.judged_from``)
    settle_s: float = 10.0
    # a plan with fewer replicas applies only once the estimate rests on this much traffic
    # (default: the window); scaling up acts on the first evidence
    scale_down_span_s: float | None = None
    drift: DriftConfig = field(default_factory=DriftConfig)
    replan: ReplanConfig = field(default_factory=ReplanConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        for name in ("window_s", "check_interval_s", "gap_interval_s", "verify_window_s",
                     "start_timeout_s", "ack_timeout_s", "drain_timeout_s", "fanout_cpus",
                     "twin_stall_s", "capacity_hold_s", "queue_min_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"controller.{name}: must be a positive number, got {v!r}")
        for name in ("shortfall_z", "settle_s", "decide_min_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"controller.{name}: must be a number >= 0, got {v!r}")
        if self.scale_down_span_s is None:
            object.__setattr__(self, "scale_down_span_s", float(self.window_s))
        if not 0 <= self.scale_down_span_s <= self.window_s:
            raise ValueError(f"controller.scale_down_span_s: must be within [0, window_s], "
                             f"got {self.scale_down_span_s}")
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

    def save_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Keep the event history where a restarted controller finds it."""
        ...

    def load_events(self) -> list[dict[str, Any]]:
        """The history ``save_events`` kept ([] if none)."""
        ...


class ControllerCore:
    """The controller's state and decisions (module docstring); thread-safe where it must be:
    ``ingest``/``routing_update`` run on the actor's event loop while ``check`` runs in a
    worker thread."""

    def __init__(self, serving: ServingSpec, settings: ControllerSettings, ops: FleetOps,
                 ctx: PlacementContext, mapper: Mapper | None = None,
                 clock: Callable[[], float] = time.time, replan_off: str | None = None) -> None:
        self.serving = serving
        self.settings = settings
        self.replan_off = replan_off
        self.ops = ops
        self.ctx = ctx
        self.clock = clock
        self.mapper = mapper
        self.verify_workers: int | None = None  # without a mapper: verify_plans' pool size
        self.calibration = OnlineCalibration()  # the twin's serving path, refitted live
        self.lock = threading.Lock()
        self.busy = threading.Lock()  # one check/transition at a time
        # what the engines served (since the last transition) and what the ingresses were
        # offered (every client request once, whatever the fleet did with it)
        self.window = WorkloadWindow(settings.window_s, min_span_s=settings.min_span_s)
        self.offered = WorkloadWindow(settings.window_s, min_span_s=settings.min_span_s)
        self.instances: dict[str, str] = {}  # endpoint -> the process that last reported
        self.checks: deque[dict[str, Any]] = deque(maxlen=MAX_CHECKS)
        self.capacity_factor = 1.0  # share of the twin's capacity plans assume (queue evidence)
        self._capacity_until = -math.inf
        self._capacity_why = ""
        self._calibration_notes: list[str] = []
        self.plan: Plan = serving.plan
        self.members: dict[str, Member] = {}
        self.roles: dict[str, ReplicaSpec] = {}
        self.registry: AdapterRegistry = serving.registry
        self.registered_later: set[str] = set()
        self.version = 0
        self.routing: dict[str, Any] = {}
        self.acks: dict[str, tuple[float, dict[str, Any]]] = {}
        self.since = clock()  # the current fleet's start: what the engines' figures rest on
        self.started = clock()  # when the ingress could first count arrivals
        self.events: list[dict[str, Any]] = []
        self.last_check: dict[str, Any] = {}
        self.gaps: dict[str, Any] = {}
        self._gap_at = -math.inf
        self._quiet_until = -math.inf
        self._quiet_workload: Workload | None = None
        self._serial = itertools.count()

    def verify(self, plans: Sequence[Plan]) -> list[Plan]:
        """Twin runs of ``plans`` with the online-calibrated profile (drift gaps, what-if,
        re-plan verification all see the live serving path)."""
        pool = {"workers": self.verify_workers} if self.verify_workers else {}
        return verify_plans(plans, profile=self.calibration.calibrated(self.ctx.profile),
                            duration_s=self.settings.verify_window_s, mapper=self.mapper, **pool)

    # -- events -------------------------------------------------------------------------------
    def event(self, kind: str, **details: Any) -> dict[str, Any]:
        e = {"t": self.clock(), "kind": kind, **details}
        with self.lock:
            self.events.append(e)
            del self.events[:-MAX_EVENTS]
            kept = list(self.events)
        self._save_events(kept)
        return e

    def _save_events(self, events: list[dict[str, Any]]) -> None:
        with contextlib.suppress(Exception):  # a convenience: serving never waits on it
            self.ops.save_events(events)

    # -- start / recover ---------------------------------------------------------------------
    def bootstrap(self) -> dict[str, Any]:
        """Adopt running engines (a restarted controller) or deploy the plan from scratch."""
        found = self.ops.describe()
        if found:
            return self._recover(found)
        with self.lock:
            self.events = []  # a new deployment starts a new history
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
            self.since = self.started = self.clock()  # judge traffic from when it could come
        self.event("deployed", replicas=len(items), seconds=round(time.perf_counter() - t0, 2))
        return self.status()

    def _recover(self, found: list[dict[str, Any]]) -> dict[str, Any]:
        """The fleet of the newest stamp: its plan, and which endpoint is which replica. An
        engine Serve replaced after a crash carries no stamp but is still a member; running
        engines the stamp does not name are leftovers of an unfinished transition."""
        newest = max(found, key=lambda d: d["version"])
        if not newest["version"]:
            silent = sorted(d["endpoint"] for d in found if d.get("unreachable"))
            if silent:
                raise RecoverLater(f"no engine that answered carries a plan stamp, and "
                                   f"{len(silent)} did not answer ({', '.join(silent[:5])}); "
                                   "retrying")
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
        try:
            history = list(self.ops.load_events())
        except Exception as exc:
            history = [{"t": self.clock(), "kind": "history_lost",
                        "error": f"{type(exc).__name__}: {exc}"}]
        with self.lock:
            self.events = history[-MAX_EVENTS:]
            self.since = self.started = self.clock()
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
                 roles: Mapping[str, ReplicaSpec], *, since: float | None = None) -> None:
        """The fleet of ``plan`` is the current one; its figures count from ``since`` (default
        now): a transition passes the moment every ingress routed by the new table, not the end
        of the old replicas' drain - the clients' arrivals and the new replicas' service are the
        new fleet's from the swap on, and a drain of an overloaded fleet's queues (40-60 s on
        two busy cores) would otherwise hold the next decision back by as long."""
        with self.lock:
            gone = set(self.members) - {m.endpoint for m in members}
            self.plan = plan
            self.members = {m.endpoint: m for m in members}
            self.roles = {m.endpoint: roles[m.endpoint] for m in members}
            self.since = self.clock() if since is None else min(since, self.clock())
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
        """An engine's telemetry: what it served, its queue, the adapters it holds. A batch
        from a new process of a member means Serve replaced that replica: an event says so."""
        b = TelemetryBatch.from_dict(batch)
        replaced = None
        with self.lock:
            if b.replica in self.members:
                self.window.add(b)
                before = self.instances.get(b.replica)
                if b.instance:
                    self.instances[b.replica] = b.instance
                if before and b.instance and before != b.instance:
                    replaced = str(self.members[b.replica].rid)
        if replaced is not None:
            self.event("replica_replaced", endpoint=b.replica, replica=replaced)

    def ingest_offered(self, batch: Mapping[str, Any]) -> None:
        """An ingress replica's count of the client requests that arrived (the offered load)."""
        b = TelemetryBatch.from_dict(batch)
        with self.lock:
            self.offered.add(b)

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
        """The offered workload, or None with the reason when the telemetry is incomplete.

        Rates come from the ingresses' arrivals (each client request once, however the fleet
        routed, retried or drained it), over the window or, after a step in the load, the
        traffic since the step. The engines must have covered the time since the last
        transition too: decisions rest on the fleet as it now is (the hysteresis)."""
        ranks = {a.id: a.rank for a in self._registered()}
        cfg = self.settings.drift
        with self.lock:
            offered = self._offered_coverage(now)
            if not offered.complete:
                return None, {"telemetry": "incomplete", "why": offered.why}
            judged = self.judged_from
            cov = self.window.coverage(now, list(self.members), since=judged)
            if not cov.complete:
                return None, {"telemetry": "incomplete", "why": cov.why}
            bins = self.offered.binned_counts(now, bin_s=cfg.change_bin_s, since=judged)
            k = latest_change(bins, cfg)
            end = self.offered.bins_end(now, since=judged)
            since = judged if k is None else end - (len(bins) - k) * cfg.change_bin_s
            est = self.offered.estimate(now, ranks=ranks,
                                        lengths=self.plan.workload.length_model(), since=since)
            unknown = self.offered.unknown_ids(now, ranks, since=since)
        span = min(offered.span_s, now - since)
        seen: dict[str, Any] = {"telemetry": "complete", "span_s": round(span, 1),
                                "since_transition_s": round(now - self.since, 1),
                                "unknown_ids": sorted(unknown)[:20]}
        if k is not None:
            seen["changed_s_ago"] = round(now - since, 1)
        moving = unsettled(bins[k or 0:], cfg)
        if moving:
            seen["unsettled"] = moving
        return est, seen

    def _offered_coverage(self, now: float) -> Any:
        """Every ingress replica counted arrivals over the span (call with the lock held)."""
        sources = list(self.offered.replicas)
        fresh = [r for r in sources
                 if now - self.offered.latest(r).t_end <= self.offered.stale_after_s]
        need = self.serving.ingress_replicas
        if len(fresh) < need:
            return Coverage(False, 0.0, why=f"{len(fresh)} of {need} ingress replica(s) report "
                                            "arrivals")
        return self.offered.coverage(now, sources, since=self.judged_from)

    @property
    def judged_from(self) -> float:
        """Where the traffic decisions rest on starts: ``settle_s`` after the current fleet
        started. A transition stalls a busy host (engines start, backlogs are released), which
        shifts arrivals in time at the ingress as at the engines; a window that holds the
        release but not the stall reads a burst as load (the hysteresis of the loop)."""
        return max(self.started, self.since + self.settings.settle_s)

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
        record: dict[str, Any] = {"t": now, "replicas": self.plan.replicas, **seen,
                                  **({"healed": healed} if healed else {})}
        if est is None:
            return self._record(record)
        offered_rps = est.total_rate_rps + est.base_model_rate_rps
        record["estimated_rps"] = round(offered_rps, 4)
        record.update(self._service(now))
        if "unsettled" in seen:  # a burst after a stall, or a ramp: no decision on it yet
            record["decision"] = f"waiting: {seen['unsettled']}"
            return self._record(record)
        if now - self._gap_at >= self.settings.gap_interval_s:
            self.gaps = self.live_vs_predicted(est, now)
            self._gap_at = now
            self._note_calibration()
        if self.gaps.get("notes"):
            record["calibration"] = self.gaps["notes"]
        planned = planned_workload(self.plan)
        placed = {a.id for a in planned.adapters}
        span = max(seen["span_s"], 1e-3)  # the seconds the estimate rests on
        arrived = offered_rps * span
        drift = detect_drift(planned, est, span, self.settings.drift,
                             registered_unplaced=sorted(self.registered_later - placed))
        reasons = list(drift.reasons)
        queues = self.growing_queues(now)
        fails = "; ".join(f"replica {r}: queue grew by {g:.0f} waiting requests while it "
                          f"finished {rate:.1f} req/s, {f * 100:.0f} % of the twin's capacity"
                          for r, (g, f, rate) in queues.items())
        reasons += [fails] if fails else []
        if not reasons:
            reasons = self.shortfall(est, arrived)
        record["drift"] = reasons
        if not reasons:
            return self._record(record)
        if arrived < self.settings.min_requests:
            record["decision"] = (f"only {arrived:.0f} requests in the window (need "
                                  f"{self.settings.min_requests}): too little traffic to re-plan")
            return self._record(record)
        if span < self.settings.window_s - 0.5 and (
                arrived < self.settings.decide_requests or span < self.settings.decide_min_s):
            # the fleet is sized for the estimate itself, so the estimate must be precise: a
            # decision on part of the window (after a step, or a transition) waits for enough
            # requests (relative error ~1/sqrt(N): 5 % at 400) over enough seconds that a
            # burst released after a stall is not taken for the load (or for the whole window)
            record["decision"] = (f"gathering evidence: {arrived:.0f} requests in {span:.0f} s "
                                  f"(need {self.settings.decide_requests} over "
                                  f"{self.settings.decide_min_s:g} s, or the whole "
                                  f"{self.settings.window_s:g}-s window)")
            return self._record(record)
        if now < self._quiet_until and self._quiet_workload is not None and not fails \
                and not detect_drift(self._quiet_workload, est, span,
                                     self.settings.drift).drifted:
            record["decision"] = ("cooling down: the workload has not moved since the last "
                                  "re-plan, which kept the plan (or deferred a scale-down)")
            return self._record(record)
        if self.replan_off:
            record["decision"] = self.replan_off
            return self._record(record)
        detected = self.event("drift", reasons=reasons)
        if queues:
            self._lower_capacity(queues, fails, now)
        cfg = self._replan_config(now)
        if self.capacity_factor < 1.0:
            record["capacity_factor"] = round(self.capacity_factor, 4)
        decision = replan(est, self.ctx, self.plan, cfg, self.verify,
                          current_fails=fails or None)
        apply = decision.apply and decision.plan is not None
        reason = decision.reason
        if (apply and decision.plan.replicas < self.plan.replicas
                and span < self.settings.scale_down_span_s):
            # fewer replicas is never urgent, and a stall of the serving path reads as a drop
            # for a few seconds: a scale-down waits for a full span of the lower load
            apply = False
            reason = (f"scale-down to {decision.plan.replicas} deferred: it rests on {span:.0f} "
                      f"s of traffic, {self.settings.scale_down_span_s:g} s needed ({reason})")
        record["decision"] = reason
        self.event("replan", apply=apply, reason=reason,
                   seconds=round(decision.wall_s, 3), timings=decision.timings,
                   replicas=decision.plan.replicas if decision.plan else None,
                   estimated_rps=round(offered_rps, 4))
        if apply and self.settings.auto_apply:
            record["transition"] = self.apply(decision.plan, detected_at=detected["t"])
        elif not decision.apply:
            self._quiet_until = now + self.settings.replan_cooldown_s
            self._quiet_workload = est
        elif not apply:  # a deferred scale-down: decided again once the span is long enough
            self._quiet_until = now + self.settings.scale_down_span_s - span
            self._quiet_workload = est
        return self._record(record)

    def _record(self, record: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.last_check = record
            self.checks.append(record)
        return record

    def _service(self, now: float) -> dict[str, Any]:
        """What the fleet did meanwhile (for the record, not the decision): requests the
        engines received and finished per second, their queues, the ingresses' in flight."""
        with self.lock:
            live = [self.window.live_metrics(now, ep, since=self.judged_from)
                    for ep in self.members]
            ingress = [self.offered.latest(r) for r in self.offered.replicas]
        rate = sum(m["request_rate_rps"] for m in live if math.isfinite(m["request_rate_rps"]))
        done = sum(m["finished"] / m["covered_s"] for m in live if m["covered_s"] > 0)
        return {"engine_arrivals_rps": round(rate, 3), "engine_finished_rps": round(done, 3),
                "engine_waiting": sum(m["waiting"] for m in live),
                "ingress_in_flight": sum(b.running for b in ingress if b is not None),
                "ingress_sources": {r[-6:]: round(now - b.t_end, 1)
                                    for r, b in zip(self.offered.replicas, ingress, strict=True)
                                    if b is not None}}

    def history(self, since: float = -math.inf) -> list[dict[str, Any]]:
        """The check records (what each check saw and did) from ``since`` on, oldest first."""
        with self.lock:
            return [r for r in self.checks if r["t"] >= since]

    def growing_queues(self, now: float) -> dict[str, tuple[float, float, float]]:
        """Replicas whose queue grew since the last transition while they finished fewer
        requests than the twin says they can: replica -> (waiting requests gained, share of the
        twin's capacity at its planned load it finished while saturated, requests/s it
        finished then). The evidence that the fleet lacks capacity, whatever the twin says of
        it. A queue that grows while its replica finishes at the twin's capacity is load above
        the plan (a burst, a rise): the estimate's business, not a capacity shortfall."""
        out: dict[str, tuple[float, float, float]] = {}
        if now - self.judged_from < self.settings.queue_min_s:
            return out  # a fleet just started fills its queues with the backlog of the swap
        cfg = self.settings.drift
        with self.lock:
            for ep, m in sorted(self.members.items(), key=lambda kv: kv[1].rid):
                gained = queue_growth(self.window.queue_series(now, ep, since=self.judged_from),
                                      cfg)
                if gained is None:
                    continue
                rate, seconds = self.window.saturated_rate(now, ep, since=self.judged_from)
                capacity = self._twin_capacity_rps(str(m.rid))
                if seconds < cfg.saturated_min_s or capacity is None:
                    continue
                share = rate / capacity
                if share < CAPACITY_EVIDENCE_SHARE:
                    out[str(m.rid)] = (gained, share, rate)
        return out

    def _twin_capacity_rps(self, rid: str) -> float | None:
        """Requests/s the twin says one replica of ``rid``'s group serves: its planned load x
        the plan's headroom (recomputed with the predictor when the plan carries none)."""
        g = self.plan.group(rid.rsplit("/", 1)[0])
        planned = g.total_rate_rps
        if planned <= 0:
            return None
        headroom = g.headroom
        if headroom is None:
            load = ReplicaLoad(g.adapter_ids, np.array([a.rank for a in g.adapters]),
                               np.array([a.rate_rps for a in g.adapters], dtype=float),
                               self.plan.workload.length_model())
            headroom = float(max_feasible_scale([load], [g.engine], self.ctx)[0])
        return planned * max(headroom, 1e-9)

    def shortfall(self, est: Workload, arrived: float) -> list[str]:
        """Groups the predictor finds feasible at their planned load but not at the estimate's
        lower confidence bound: the fleet does not serve what is offered (a rise too small to
        count as drift can still exceed a plan sized at the edge)."""
        low = max(0.0, 1.0 - self.settings.shortfall_z / math.sqrt(max(arrived, 1.0)))
        if low <= 0.0:
            return []
        at = rerate(self.plan, replace(est.scaled(low), base_model_rate_rps=0.0),
                    predictor=self.ctx.predictor)
        if at is None:  # the estimate has adapters the plan does not place: drift says so
            return []
        short = [g.name for g, now_g in zip(self.plan.groups, at.groups, strict=True)
                 if is_feasible(g.predicted, self.ctx) and not is_feasible(now_g.predicted,
                                                                          self.ctx)]
        if not short:
            return []
        return [f"the fleet does not serve the estimate: {', '.join(short[:5])} predicted "
                f"infeasible at {low:.2f}x the estimated {est.total_rate_rps:.1f} req/s"]

    def _lower_capacity(self, queues: Mapping[str, tuple[float, float, float]],
                        why: str, now: float) -> None:
        """Queue evidence: a saturated replica that finishes ``share`` of the twin's capacity
        can do no more. Plans assume that share of the twin's capacity (the lowest over the
        queueing replicas, within [``MIN_CAPACITY_FACTOR``, 0.95]), held ``capacity_hold_s``."""
        share = min((s for _, s, _ in queues.values()), default=0.95)
        before = self.capacity_factor if now < self._capacity_until else 1.0
        self.capacity_factor = max(MIN_CAPACITY_FACTOR, min(before, share, 0.95))
        self._capacity_until = now + self.settings.capacity_hold_s
        self._capacity_why = why
        self.event("capacity", factor=round(self.capacity_factor, 4), reason=why,
                   hold_s=self.settings.capacity_hold_s)

    def _replan_config(self, now: float) -> ReplanConfig:
        """The re-plan rule, its utilisations lowered by the live capacity factor while held."""
        cfg = self.settings.replan
        if now >= self._capacity_until:
            self.capacity_factor = 1.0
            return cfg
        return replace(cfg, target_utilisations=tuple(
            round(u * self.capacity_factor, 4) for u in cfg.target_utilisations))

    def _note_calibration(self) -> None:
        """Live figures off the twin's: noted (status, an event when the set changes), never
        acted on; online calibration closes them."""
        notes = calibration_notes(self.gaps.get("gaps"), self.settings.drift)
        self.gaps["notes"] = notes
        if notes and notes != self._calibration_notes:
            self.event("calibration_gap", notes=notes)
        self._calibration_notes = notes

    def live_vs_predicted(self, est: Workload, now: float) -> dict[str, Any]:
        """Per replica: live figures vs the twin's for the observed workload on this placement."""
        current = rerate(self.plan, est)
        if current is None:
            return {"t": now, "why": "the live workload has adapters the plan does not place"}
        verified = self.verify([current])[0]
        with self.lock:
            live = {ep: self.window.live_metrics(now, ep, since=self.judged_from)
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
        with self.lock:
            ingress = self.offered.live_metrics_total(now, since=self.judged_from)
        weights = {r: float(v["live"].get("finished") or 0) for r, v in replicas.items()}
        fleet_pred = [(weights[r], v["predicted"].get("ttft_mean_ms"))
                      for r, v in replicas.items()]
        total = sum(w for w, p in fleet_pred if isinstance(p, float))
        pred_ttft = (sum(w * p for w, p in fleet_pred if isinstance(p, float)) / total
                     if total > 0 else math.nan)
        jumps = self.calibration.update(
            {r: {"live": live[v["endpoint"]], "predicted": v["predicted"]}
             for r, v in replicas.items()}, ingress, pred_ttft, self.settings.calibration)
        if jumps:
            self.event("calibration_jump", notes=jumps)
        return {"t": now, "twin_window_s": self.settings.verify_window_s,
                "replicas": replicas, "gaps": gaps,
                "calibration": self.calibration.to_dict(self.ctx.profile)}

    # -- applying a plan ----------------------------------------------------------------------
    def apply(self, plan: Plan, *, detected_at: float | None = None) -> dict[str, Any]:
        """Move the fleet to ``plan`` safely (control/transition.py); returns the timeline."""
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
        self._install(plan, t.members, roles, since=ops.swapped_at)
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
        """A plan for the live workload changed as asked, with its twin figures; not applied.

        The estimate is taken between checks, never while a transition runs (waiting for it
        up to ``WHATIF_WAIT_S``): a what-if asked during a transition once read 2.9 req/s where
        the check before it had read 24 (and 24.7 were offered)."""
        if self.replan_off:
            raise ControllerError(self.replan_off)
        if not self.busy.acquire(timeout=WHATIF_WAIT_S):
            raise ControllerError(f"a re-plan or transition has run for over {WHATIF_WAIT_S:g} s;"
                                  " ask again when `lorafleet status` shows it done")
        try:
            est, seen = self.estimate(self.clock())
        finally:
            self.busy.release()
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
                "capacity": {"factor": self.capacity_factor, "why": self._capacity_why,
                             "until": self._capacity_until}
                if self.clock() < self._capacity_until else None,
                "settings": _plain(asdict(self.settings)),
            }

    def shutdown(self) -> None:
        """Remove the ingress and every engine this controller runs; forget the history."""
        self.ops.delete_ingress()
        self.ops.stop(list(self.members))
        self.ops.save_events([])


class _Publishing:
    """The transition's Ops: the cluster's, with ``publish`` bound to the plans involved."""

    def __init__(self, core: ControllerCore, plan: Plan, old_routing: Mapping[str, Any]) -> None:
        self.core, self.plan, self.old_routing = core, plan, old_routing
        self.start = core.ops.start
        self.stop = core.ops.stop
        self.wait_drained = core.ops.wait_drained
        self.swapped_at: float | None = None  # when every ingress routed by the new table

    def wait_acked(self, version: int, timeout_s: float) -> None:
        self.core.ops.wait_acked(version, timeout_s)
        self.swapped_at = self.core.clock()

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
