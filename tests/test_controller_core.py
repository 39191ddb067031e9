"""The controller's decisions and transitions without Ray: a fake cluster records what it is
asked to do, so the order of a transition, its rollback, the no-re-plan-on-lost-telemetry rule
and recovery from the replicas can be checked exactly."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from orchestrator.control.controller import ControllerCore, ControllerSettings, planned_workload
from orchestrator.control.drift import DriftConfig
from orchestrator.control.transition import Member, TransitionError, execute, plan_transition
from orchestrator.serving.routing import ReplicaId
from orchestrator.serving.spec import ReplicaSpec, ServingSpec
from placement.context import PlacementContext
from placement.planner import make_plan
from placement.predictors import make_predictor
from twin.config import EngineConfig
from twin.profile import load_profile
from twin.workload import AdapterSpec, LengthModel, Workload

IDS = [f"a{i:02d}" for i in range(16)]
LENGTHS = LengthModel(kind="fixed", prompt=256, output=128)


def workload(total: float, hot: Sequence[str] = ("a00", "a01")) -> Workload:
    rest = [a for a in IDS if a not in hot]
    return Workload("w", tuple(
        AdapterSpec(a, 8, total * 0.7 / len(hot) if a in hot else total * 0.3 / len(rest))
        for a in IDS), LENGTHS)


class FakeCluster:
    """Records every call; ``fail`` names a method that raises."""

    def __init__(self, core_ref: Any = None, fail: str | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = fail
        self.core_ref = core_ref
        self.found: list[dict[str, Any]] = []

    def _do(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))
        if name == self.fail:
            raise RuntimeError(f"{name} broke")

    def start(self, items: Sequence[tuple[str, ReplicaSpec]], timeout_s: float) -> None:
        self._do("start", [ep for ep, _ in items])

    def assign(self, endpoint: str, spec: ReplicaSpec, adapter_ids: frozenset[str]) -> None:
        self._do("assign", (endpoint, str(spec.replica_id), sorted(adapter_ids)))

    def publish(self, members: Sequence[Member], *, rollback: bool = False) -> int:
        self._do("publish", "old" if rollback else "new")
        return 7

    def wait_acked(self, version: int, timeout_s: float) -> None:
        self._do("wait_acked", version)

    def wait_drained(self, version: int, timeout_s: float) -> None:
        self._do("wait_drained", version)

    def stop(self, endpoints: Sequence[str]) -> None:
        self._do("stop", sorted(endpoints))

    def describe(self) -> list[dict[str, Any]]:
        return self.found

    def deploy_ingress(self, routing: Any) -> None:
        self._do("deploy_ingress", routing["version"])

    def delete_ingress(self) -> None:
        self._do("delete_ingress", None)

    def stamp(self, endpoints: Sequence[str], stamp: Any) -> None:
        self._do("stamp", stamp["version"])
        self.stamps = {ep: dict(stamp) for ep in endpoints}

    def save_events(self, events: Sequence[Any]) -> None:
        self.events = [dict(e) for e in events]

    def load_events(self) -> list[dict[str, Any]]:
        return list(getattr(self, "events", []))

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


def spec(group: str, copy: int, adapters: Sequence[str], max_loras: int = 4) -> ReplicaSpec:
    from orchestrator.serving.registry import AdapterEntry

    return ReplicaSpec(group=group, copy=copy, engine_kind="sim",
                       engine=EngineConfig(max_loras=max_loras),
                       adapters=tuple(AdapterEntry(a, 8) for a in adapters), model="sim:x")


def member(ep: str, s: ReplicaSpec) -> Member:
    return Member(ep, s.replica_id, s.engine, frozenset(a.id for a in s.adapters))


# ------------------------------------------------------------------------------ transition
def test_plan_transition_retargets_same_config_by_overlap_and_starts_the_rest() -> None:
    old = [member("e1", spec("g0", 0, ["a", "b"])), member("e2", spec("g1", 0, ["c", "d"])),
           member("e3", spec("g2", 0, ["x"], max_loras=8))]
    new = [spec("n0", 0, ["c", "a"]), spec("n1", 0, ["d", "b"]), spec("n2", 0, ["b", "c"]),
           spec("n3", 0, ["e"], max_loras=2)]
    names = iter(["new-1", "new-2"])
    t = plan_transition(old, new, lambda: next(names))
    assert {(r.member.endpoint, str(r.spec.replica_id)) for r in t.retarget} == {
        ("e1", "n0/0"), ("e2", "n1/0")} or {
        (r.member.endpoint, str(r.spec.replica_id)) for r in t.retarget} == {
        ("e1", "n1/0"), ("e2", "n0/0")}
    assert [str(s.replica_id) for _, s in t.start] == ["n2/0", "n3/0"]
    assert [m.endpoint for m in t.stop] == ["e3"]  # nobody else runs max_loras=8
    assert t.summary()["started"] == 2 and t.summary()["stopped"] == 1
    assert {m.endpoint for m in t.members} == {"e1", "e2", "new-1", "new-2"}


def _transition() -> tuple[Any, list[Member], dict[str, ReplicaSpec]]:
    s1, s2 = spec("g0", 0, ["a", "b"]), spec("g1", 0, ["c"], max_loras=8)
    fleet = [member("e1", s1), member("e2", s2)]
    t = plan_transition(fleet, [spec("n0", 0, ["a", "c"]), spec("n1", 0, ["b"], max_loras=2)],
                        lambda: "e3")
    return t, fleet, {"e1": s1, "e2": s2}


def test_execute_makes_before_it_breaks() -> None:
    t, fleet, roles = _transition()
    ops = FakeCluster()
    line = execute(t, fleet, ops, roles=roles, start_timeout_s=1, ack_timeout_s=1,
                   drain_timeout_s=1)
    assert ops.names() == ["start", "assign", "publish", "wait_acked", "wait_drained",
                           "assign", "stop"]
    assert ops.calls[1] == ("assign", ("e1", "g0/0", ["a", "b", "c"]))  # grown: old + new
    assert ops.calls[5] == ("assign", ("e1", "n0/0", ["a", "c"]))  # shrunk after the drain
    assert ops.calls[6] == ("stop", ["e2"]) and not line.errors


@pytest.mark.parametrize("broken", ["start", "assign", "wait_acked"])
def test_a_failed_transition_rolls_back(broken: str) -> None:
    t, fleet, roles = _transition()
    ops = FakeCluster(fail=broken)
    with pytest.raises(TransitionError, match=f"{broken} broke.*rolled back"):
        execute(t, fleet, ops, roles=roles, start_timeout_s=1, ack_timeout_s=1,
                drain_timeout_s=1)
    after = ops.calls[ops.names().index(broken) + 1:]
    assert ("stop", ["e3"]) in after  # the engine started for the new plan is gone
    if broken == "wait_acked":
        assert ("publish", "old") in after  # the old table is back
        assert ("assign", ("e1", "g0/0", ["a", "b"])) in after  # grown engine restored
    assert not any(n == "stop" and "e2" in a for n, a in ops.calls)  # the old fleet stays


# ------------------------------------------------------------------------------ the core
@pytest.fixture
def core(tmp_path) -> tuple[ControllerCore, FakeCluster, list[float]]:
    # the control logic on the engine alone: its sizes are the engine's, whatever serving-path
    # term the shipped profile carries (tests/test_online_calibration.py covers the term)
    profile = load_profile("tiny-llama-cpu").with_serving_path(None)
    ctx = PlacementContext.for_profile(profile, make_predictor("analytic", profile))
    plan = make_plan(workload(10.0), ctx)
    plan.to_yaml(tmp_path / "plan.yaml")
    serving = ServingSpec.from_args({"plan_path": str(tmp_path / "plan.yaml"), "engine": "sim"})
    now = [1000.0]
    settings = ControllerSettings(window_s=20, min_span_s=10, verify_window_s=60,
                                  queue_min_s=20, settle_s=0.0, decide_requests=100,
                                  decide_min_s=5.0,
                                  drift=DriftConfig(gap=10.0))
    cluster = FakeCluster()
    c = ControllerCore(serving, settings, cluster, ctx, clock=lambda: now[0])
    c.verify_workers = 1
    return c, cluster, now


def batch(source: str, t: float, arrivals: dict[str, int], waiting: int = 0,
          finished: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
    """One second's telemetry batch of ``source`` (an engine endpoint or an ingress)."""
    return {"replica": source, "t_start": t - 1, "t_end": t, "arrivals": arrivals,
            "finished": finished if finished is not None else {}, "prompt_tokens": {},
            "output_tokens": {}, "ttft_ms_sum": 0.0, "latency_ms_sum": 0.0, "failed": 0,
            "running": 0, "waiting": waiting, **extra}


def feed(c: ControllerCore, now: list[float], w: Workload, seconds: int,
         silent: Sequence[str] = (), engines: Workload | None = None,
         waiting: Any = None, served: Any = None) -> None:
    """One batch per second from the ingress carrying exactly the expected arrivals of ``w``
    (the offered load; fractions carried over to the next second), and one per engine replica
    with what it received: ``engines`` (default ``w``) split over the replicas serving each
    adapter. ``waiting(ep, k)``: the queue an engine reports at second ``k``; ``served(ep)``: the
    share of its arrivals it finishes (default all)."""
    owed: dict[tuple[str, str], float] = {}
    for k in range(seconds):
        now[0] += 1.0
        offered = {}
        for i, a in enumerate(w.adapters):  # adapters out of phase, as Poisson ones would be
            owed["ingress", a.id] = owed.get(("ingress", a.id), (i * 0.618) % 1) + a.rate_rps
            offered[a.id] = int(owed["ingress", a.id])
            owed["ingress", a.id] -= offered[a.id]
        if "ingress" not in silent:
            c.ingest_offered(batch("ing-1", now[0], offered))
        for ep, m in c.members.items():
            arrivals = {}
            for a in (engines or w).adapters:
                if a.id in m.adapters:
                    n_serving = sum(1 for x in c.members.values() if a.id in x.adapters)
                    owed[ep, a.id] = owed.get((ep, a.id), 0.0) + a.rate_rps / n_serving
                    arrivals[a.id] = int(owed[ep, a.id])
                    owed[ep, a.id] -= arrivals[a.id]
            if ep in silent:
                continue
            finished = {}
            for a, n in arrivals.items():
                owed["done", ep, a] = owed.get(("done", ep, a), 0.0) + n * (
                    served(ep) if served else 1.0)
                finished[a] = int(owed["done", ep, a])
                owed["done", ep, a] -= finished[a]
            c.ingest(batch(ep, now[0], arrivals, waiting(ep, k) if waiting else 0,
                           finished=finished, adapters_held=sorted(m.adapters)))


def test_bootstrap_deploys_engines_then_the_ingress(core) -> None:
    c, cluster, _ = core
    c.bootstrap()
    assert cluster.names() == ["start", "deploy_ingress", "wait_acked", "stamp"]
    assert len(c.members) == c.plan.replicas == 2 and c.version == 1
    assert c.routing_update("ing-1", {"version": 0})["version"] == 1
    assert c.routing_update("ing-1", {"version": 1}) is None


def test_lost_telemetry_means_no_replan(core) -> None:
    c, cluster, now = core
    c.bootstrap()
    silent = sorted(c.members)[0]
    feed(c, now, workload(30.0), 25, silent=[silent])
    out = c.check()
    assert out["telemetry"] == "incomplete" and silent in out["why"]
    assert "drift" not in out and "start" not in cluster.names()[4:]


def test_a_tripled_load_scales_up_and_a_steady_one_does_not(core) -> None:
    c, cluster, now = core
    c.bootstrap()
    feed(c, now, planned_workload(c.plan), 25)
    steady = c.check()
    assert steady["telemetry"] == "complete" and steady["drift"] == []
    feed(c, now, workload(30.0), 25)
    out = c.check()
    assert any("total rate" in r for r in out["drift"])
    assert out["transition"]["ok"] and c.plan.replicas > 2 == out["transition"]["stopped"] + (
        out["transition"]["retargeted"])
    assert c.version == 2 and {k for k in ("drift", "replan", "transition")} <= {
        e["kind"] for e in c.events}


def tripled_6s_ago(core) -> tuple[ControllerCore, list[float]]:
    """A bootstrapped core (not applying its decisions) fed its planned load for 14 s, then
    30 req/s (three times it) for 6 s."""
    c, _, now = core
    c.settings = ControllerSettings(**{**c.settings.__dict__, "auto_apply": False})
    c.bootstrap()
    feed(c, now, planned_workload(c.plan), 14)
    feed(c, now, workload(30.0), 6)
    return c, now


def test_a_step_in_the_load_is_estimated_from_the_traffic_after_it(core) -> None:
    """A tripling 6 s before the check: the estimate is the new rate, not the window's blend of
    old and new (which would size the fleet for a fraction of the step)."""
    c, now = tripled_6s_ago(core)
    est, seen = c.estimate(now[0])
    # (the feed's slow adapters arrive in whole requests every few seconds: +-1 s)
    assert 5.0 <= seen["changed_s_ago"] == seen["span_s"] <= 7.0
    assert est.total_rate_rps == pytest.approx(30.0, rel=0.1)
    # without the step the whole window counts
    feed(c, now, workload(30.0), 20)
    est, seen = c.estimate(now[0])
    assert "changed_s_ago" not in seen and seen["span_s"] == 20.0
    assert est.total_rate_rps == pytest.approx(30.0, rel=0.05)


def test_a_replan_is_sized_for_the_estimate_not_more(core, monkeypatch) -> None:
    """After a step as after a whole window, the re-plan is handed the offered estimate itself
    (a margin on top sized fleets above what the twin needs)."""
    import orchestrator.control.controller as controller

    handed: list[Workload] = []
    real = controller.replan
    monkeypatch.setattr(controller, "replan",
                        lambda w, *a, **k: handed.append(w) or real(w, *a, **k))
    c, now = tripled_6s_ago(core)
    est, seen = c.estimate(now[0])
    out = c.check()
    assert "changed_s_ago" in seen and out["decision"]
    assert handed[-1].total_rate_rps == pytest.approx(est.total_rate_rps)
    assert out["estimated_rps"] == pytest.approx(est.total_rate_rps, rel=1e-4)


def test_the_estimate_reads_the_ingress_not_the_engines(core) -> None:
    """Engines that report three times the offered arrivals (a backlog released after a swap,
    retries, drains) change nothing: the offered load is what the ingress counted."""
    c, cluster, now = core
    c.bootstrap()
    planned = planned_workload(c.plan)
    feed(c, now, planned, 25, engines=planned.scaled(3.0))
    out = c.check()
    assert out["telemetry"] == "complete" and out["drift"] == []
    assert out["estimated_rps"] == pytest.approx(planned.total_rate_rps, rel=0.05)
    assert "start" not in cluster.names()[4:]


def test_silent_ingress_means_no_replan(core) -> None:
    c, cluster, now = core
    c.bootstrap()
    feed(c, now, workload(30.0), 25, silent=["ingress"])
    out = c.check()
    assert out["telemetry"] == "incomplete" and "ingress" in out["why"]
    assert "drift" not in out and "start" not in cluster.names()[4:]


def test_a_calibration_gap_is_reported_not_acted_on(core, monkeypatch) -> None:
    """Engines serving far below the twin's figures with no growing queue: a calibration gap
    in the record and one event, no re-plan."""
    c, cluster, now = core
    c.settings = ControllerSettings(**{**c.settings.__dict__,
                                       "drift": DriftConfig(gap=0.3)})
    c.bootstrap()
    monkeypatch.setattr(c, "live_vs_predicted", lambda est, t: {
        "t": t, "gaps": {"group-000/0 throughput": -0.6, "group-001/0 ttft": 1.9}})
    feed(c, now, planned_workload(c.plan), 25)
    out = c.check()
    assert out["drift"] == [] and "decision" not in out
    assert any("calibration gap" in n and "60 % below" in n for n in out["calibration"])
    assert [e["kind"] for e in c.events].count("calibration_gap") == 1
    assert "start" not in cluster.names()[4:]


def test_a_growing_queue_scales_up_where_the_twin_sees_no_need(core) -> None:
    """At the planned load the twin is content, but one engine's queue gains two requests a
    second while it finishes 80 % of its arrivals, far below the capacity the twin gives it
    (its planned load x the plan's headroom): the controller adds a replica, and later plans
    assume that lower capacity."""
    c, cluster, now = core
    c.bootstrap()
    slow = sorted(c.members)[0]
    group = c.plan.group(str(c.members[slow].rid).rsplit("/", 1)[0])
    twin_rps = group.total_rate_rps * group.headroom
    expected = 0.8 * group.total_rate_rps / twin_rps  # = 0.8 / headroom
    assert expected < 0.9
    feed(c, now, planned_workload(c.plan), 25,
         waiting=lambda ep, k: 2 * k if ep == slow else 0,
         served=lambda ep: 0.8 if ep == slow else 1.0)
    out = c.check()
    assert any("queue grew" in r for r in out["drift"]), out
    share = int(re.search(r"(\d+) % of the twin's capacity", out["drift"][0]).group(1)) / 100
    assert share == pytest.approx(expected, abs=0.06)  # integer counts per second: +-
    assert out["transition"]["ok"] and c.plan.replicas == 3, out["decision"]
    # plans now assume that share of the twin's capacity, for a while
    f = out["capacity_factor"]
    assert f == pytest.approx(max(0.25, expected), abs=0.06)
    assert c._replan_config(now[0]).target_utilisations == (round(f, 4), round(0.85 * f, 4))
    assert c._replan_config(now[0] + c.settings.capacity_hold_s).target_utilisations == (
        1.0, 0.85)
    kinds = [e["kind"] for e in c.events]
    assert "capacity" in kinds and kinds.index("capacity") < kinds.index("transition")


def test_a_burst_that_fills_queues_is_no_capacity_evidence(core) -> None:
    """A backlog released after a stall: the engines get three times their planned load and
    their queues grow, but they finish at the capacity the twin gives them. That is load, not
    missing capacity: no capacity factor, and the estimate (the ingress's count) is unmoved."""
    c, cluster, now = core
    c.bootstrap()
    planned = planned_workload(c.plan)
    heads = {ep: c.plan.group(str(m.rid).rsplit("/", 1)[0]).headroom
             for ep, m in c.members.items()}
    assert all(h is not None and h < 3.0 for h in heads.values())
    feed(c, now, planned, 25, engines=planned.scaled(3.0),
         waiting=lambda ep, k: 3 * k, served=lambda ep: heads[ep] / 3.0)
    out = c.check()
    assert not any("queue grew" in r for r in out["drift"]), out
    assert "capacity_factor" not in out and "capacity" not in [e["kind"] for e in c.events]
    assert out["estimated_rps"] == pytest.approx(planned.total_rate_rps, rel=0.05)


def test_a_steady_queue_is_no_evidence() -> None:
    from orchestrator.control.drift import queue_growth

    cfg = DriftConfig(queue_growth=16)
    assert queue_growth([(t, 30) for t in range(20)], cfg) is None  # long but not growing
    assert queue_growth([(t, 40 - 2 * t) for t in range(20)], cfg) is None  # draining
    assert queue_growth([(t, t) for t in range(10)], cfg) is None  # grows by 9 < 16
    assert queue_growth([(t, 2 * t) for t in range(20)], cfg) == pytest.approx(38.0)
    assert queue_growth([(0, 0), (1, 50)], cfg) is None  # two points are no trend


def test_a_rise_within_the_drift_threshold_still_scales_a_fleet_sized_at_its_edge(core
                                                                                   ) -> None:
    """15 % more than planned is no drift (20 %), but a plan packed to its edge cannot serve
    it: the predictor's verdict on the current fleet at the estimate's lower bound says so."""
    from orchestrator.control.replan import rerate

    c, cluster, now = core
    tight = make_plan(workload(10.0), replace(c.ctx, target_utilisation=1.0))
    edge = min(g.headroom for g in tight.groups) * 0.99
    at_edge = rerate(tight, workload(10.0 * edge), predictor=c.ctx.predictor)
    c.plan = at_edge
    c.serving = c.serving.with_(plan=at_edge)
    c.bootstrap()
    feed(c, now, workload(10.0 * edge * 1.15), 25)
    out = c.check()
    assert not any("total rate" in r for r in out["drift"]) and any(
        "does not serve the estimate" in r for r in out["drift"]), out
    assert out["transition"]["ok"] and c.plan.replicas > at_edge.replicas


def test_recovery_adopts_the_newest_stamped_fleet(core) -> None:
    """A restarted controller takes plan, version and fleet from the newest stamp; a member
    Serve replaced (no stamp) stays a member, an engine no stamp names is stopped."""
    c, cluster, _ = core
    c.bootstrap()
    roles = dict(c.roles)
    replaced, kept = sorted(roles)
    cluster.found = [{**cluster.stamps[kept], "endpoint": kept},
                     {"endpoint": replaced, "version": 0},
                     {"endpoint": "leftover", "version": 0}]
    again = ControllerCore(c.serving, c.settings, cluster, c.ctx, clock=c.clock)
    again.bootstrap()
    assert set(again.members) == set(roles) and again.version == 1
    assert again.routing["endpoints"] == {str(s.replica_id): ep for ep, s in roles.items()}
    assert {ep: s.replica_id for ep, s in again.roles.items()} == {
        ep: s.replica_id for ep, s in roles.items()}
    assert cluster.calls[-1] == ("stop", ["leftover"])
    assert ReplicaId("group-000", 0) in {m.rid for m in again.members.values()}


def test_adapters_registered_later_survive_a_controller_restart(core) -> None:
    """``register`` stamps the engines; after a re-plan places the new adapter, a restarted
    controller rebuilds the fleet from the stamp although the deploy's registry never had it."""
    from orchestrator.serving.registry import AdapterEntry

    c, cluster, now = core
    c.bootstrap()
    assert c.register([AdapterEntry("n1", 8, uri="sim://n1")]) == ["n1"]
    assert all(st["registered"] == [{"id": "n1", "rank": 8, "path": None, "uri": "sim://n1",
                                     "sha256": None}]
               for st in cluster.stamps.values())
    feed(c, now, planned_workload(c.plan), 25)
    out = c.check()
    assert "new adapters registered: n1" in out["drift"] and out["transition"]["ok"]
    assert "n1" in {a.id for g in c.plan.groups for a in g.adapters}
    assert "n1" not in c.serving.registry
    cluster.found = [{**st, "endpoint": ep} for ep, st in cluster.stamps.items()]
    again = ControllerCore(c.serving, c.settings, cluster, c.ctx, clock=c.clock)
    again.bootstrap()
    assert again.version == c.version and again.registered_later == {"n1"}
    assert any("n1" in m.adapters for m in again.members.values())


def test_a_replaced_replica_is_an_event_and_the_history_survives_a_restart(core) -> None:
    c, cluster, now = core
    c.bootstrap()
    ep = sorted(c.members)[0]
    held = sorted(c.members[ep].adapters)
    c.ingest(batch(ep, now[0] + 1, {}, instance="proc-1", adapters_held=held))
    c.ingest(batch(ep, now[0] + 2, {}, instance="proc-1", adapters_held=held))
    assert "replica_replaced" not in [e["kind"] for e in c.events]
    c.ingest(batch(ep, now[0] + 3, {}, instance="proc-2", adapters_held=held))
    replaced = [e for e in c.events if e["kind"] == "replica_replaced"]
    assert [(e["endpoint"], e["replica"]) for e in replaced] == [(ep, str(c.members[ep].rid))]
    cluster.found = [{**st, "endpoint": e} for e, st in cluster.stamps.items()]
    again = ControllerCore(c.serving, c.settings, cluster, c.ctx, clock=c.clock)
    again.bootstrap()
    assert [e["kind"] for e in again.events] == ["deployed", "replica_replaced", "recovered"]


def test_recovery_waits_for_engines_that_do_not_answer(core) -> None:
    """Engines that time out on ``describe`` are not "unstamped": recovery says it will retry
    instead of declaring the fleet unrecoverable."""
    from orchestrator.control.controller import RecoverLater

    c, cluster, _ = core
    c.bootstrap()
    cluster.found = [{"endpoint": e, "version": 0, "unreachable": True} for e in c.members]
    again = ControllerCore(c.serving, c.settings, cluster, c.ctx, clock=c.clock)
    with pytest.raises(RecoverLater, match="did not answer"):
        again.bootstrap()
    cluster.found = [{"endpoint": e, "version": 0} for e in c.members]
    with pytest.raises(RuntimeError, match="none was stamped"):
        again.bootstrap()


def test_a_transition_s_first_seconds_are_not_judged(core) -> None:
    """After a transition a busy host releases the requests it stalled as a burst: the loop
    judges nothing until ``settle_s`` + ``min_span_s`` of traffic after it."""
    c, cluster, now = core
    c.settings = replace(c.settings, settle_s=8.0)
    c.bootstrap()
    feed(c, now, planned_workload(c.plan), 12)
    early = c.check()
    assert early["telemetry"] == "incomplete" and "only 4.0 s" in early["why"]
    feed(c, now, planned_workload(c.plan), 6)
    assert c.check()["telemetry"] == "complete" and c.judged_from == c.since + 8.0


def test_the_new_fleet_counts_from_the_swap_not_the_end_of_the_drain(core) -> None:
    """The old replicas' drain (tens of seconds after an overload) serves no new arrival: the
    new fleet's window starts when every ingress routes by the new table, so the next decision
    is not held back by the drain."""
    c, cluster, now = core
    big = make_plan(workload(30.0), c.ctx)
    c.bootstrap()
    acked, drained = [], []

    def wait_acked(version: int, timeout_s: float) -> None:
        now[0] += 2.0  # the ingresses take 2 s to ack the new table
        acked.append(now[0])

    def wait_drained(version: int, timeout_s: float) -> None:
        now[0] += 45.0  # the old replicas' queues take 45 s to drain
        drained.append(now[0])

    cluster.wait_acked, cluster.wait_drained = wait_acked, wait_drained
    out = c.apply(big)
    assert out["ok"] and c.plan.replicas == big.replicas
    assert acked and drained and c.since == acked[0] and now[0] - c.since >= 45.0


def test_a_scale_down_waits_for_a_full_window_of_the_lower_load(core) -> None:
    """A drop seen for a few seconds (a stall of the serving path looks the same) does not
    release replicas; the same drop over the whole window does."""
    c, cluster, now = core
    big = make_plan(workload(30.0), c.ctx)
    c.plan, c.serving = big, c.serving.with_(plan=big)
    c.bootstrap()
    feed(c, now, planned_workload(c.plan), 12)
    feed(c, now, workload(12.0), 14)
    out = c.check()
    assert any("total rate" in r for r in out["drift"]), out
    assert "deferred" in out["decision"] and "transition" not in out, out["decision"]
    assert c.plan.replicas == big.replicas
    feed(c, now, workload(12.0), 20)
    out = c.check()
    assert out["transition"]["ok"] and c.plan.replicas < big.replicas, out["decision"]


def test_a_burst_after_a_stall_is_no_rate_to_decide_on() -> None:
    """Arrivals held back by a busy host come all at once: the span's mean is a rate nobody
    offers for long. A steady span, noise included, is settled; a step found by the change-point
    search starts the span, so both its halves carry the new rate."""
    from orchestrator.control.drift import unsettled

    rng = np.random.default_rng(3)
    steady = [{"a": float(c)} for c in rng.poisson(28, 10)]
    assert unsettled(steady) is None
    burst = [{"a": 0.0}] * 3 + [{"a": 80.0}] * 3 + [{"a": 28.0}] * 4  # stall, release, steady
    why = unsettled(burst)
    assert why is not None and "still moving" in why and "in its last" in why
    assert unsettled([{"a": 28.0}] * 5 + [{"a": 56.0}] * 5) is not None  # a step inside
    assert unsettled([{"a": 56.0}] * 6) is None  # the span after that step
    assert unsettled([{"a": 1.0}, {"a": 3.0}, {"a": 1.0}, {"a": 3.0}]) is None  # few: noise


def test_a_decision_on_part_of_the_window_waits_for_enough_requests(core) -> None:
    """The fleet is sized for the estimate, so one that rests on the few seconds after a step
    must hold enough requests to be precise, or the whole window."""
    c, cluster, now = core
    c.settings = replace(c.settings, decide_requests=400, decide_min_s=10.0, auto_apply=False)
    c.bootstrap()
    feed(c, now, planned_workload(c.plan), 14)
    feed(c, now, workload(30.0), 7)  # ~210 requests since the step
    out = c.check()
    assert out["decision"].startswith("gathering evidence") and "need 400" in out["decision"]
    feed(c, now, workload(30.0), 8)  # ~450 since the step, over 15 s
    out = c.check()
    assert "gathering" not in out["decision"] and any("total rate" in r for r in out["drift"])


def test_a_burst_of_many_requests_in_a_few_seconds_is_not_yet_a_decision(core) -> None:
    """Enough requests but over too few seconds (a backlog released after a stall lasts a few):
    the decision waits until the span after the step is ``decide_min_s`` long."""
    c, cluster, now = core
    c.settings = replace(c.settings, decide_requests=400, decide_min_s=10.0, auto_apply=False)
    c.bootstrap()
    feed(c, now, planned_workload(c.plan), 14)
    feed(c, now, workload(100.0), 6)  # ~600 requests in 6 s
    out = c.check()
    assert out["decision"].startswith("gathering evidence") and "over 10 s" in out["decision"]
    feed(c, now, workload(100.0), 6)  # 12 s of the new rate
    out = c.check()
    assert "gathering" not in out["decision"] and any("total rate" in r for r in out["drift"])


def test_a_whatif_waits_for_a_running_transition(core, monkeypatch) -> None:
    """A what-if never estimates while a check or transition holds the loop: it waits for it
    (bounded), then answers from the settled fleet, or says why it cannot."""
    import threading

    import orchestrator.control.controller as controller
    from orchestrator.control.controller import ControllerError

    c, cluster, now = core
    c.bootstrap()
    feed(c, now, planned_workload(c.plan), 25)
    monkeypatch.setattr(controller, "WHATIF_WAIT_S", 0.2)
    with c.busy, pytest.raises(ControllerError, match="transition has run for over 0.2 s"):
        c.whatif(rate_scale=2.0)  # while a transition is running
    release = threading.Timer(0.1, c.busy.release)
    c.busy.acquire()
    release.start()  # the transition ends while the what-if waits
    out = c.whatif(rate_scale=2.0)
    assert out["workload"]["total_rate_rps"] == pytest.approx(
        2 * planned_workload(c.plan).total_rate_rps, rel=0.25)
    assert not c.busy.locked()


def test_online_calibration_follows_slow_engines_and_feeds_the_twin(core) -> None:
    """Engines whose tokens come 200 ms apart (the twin says far less), nothing queued: the
    step scale moves one bounded step per gap check, a jump event says so, and the next twin
    run already predicts slower decoding."""
    c, _, now = core
    c.bootstrap()
    planned = planned_workload(c.plan)
    for _ in range(25):
        now[0] += 1.0
        for ep, m in c.members.items():
            done = {a.id: 1 for a in planned.adapters if a.id in m.adapters}
            n = sum(done.values())
            c.ingest(batch(ep, now[0], done, finished=done,
                           prompt_tokens={a: 256 for a in done},
                           output_tokens={a: 128 for a in done}, ttft_ms_sum=50.0 * n,
                           latency_ms_sum=(50.0 + 127 * 200.0) * n,
                           adapters_held=sorted(m.adapters)))
        c.ingest_offered(batch("ing-1", now[0], {a.id: 1 for a in planned.adapters}))
    first = c.live_vs_predicted(planned, now[0])
    assert c.calibration.updates == 1 and c.calibration.step_scale == pytest.approx(1.10)
    assert first["calibration"]["summary"].startswith("step x")
    assert [e["kind"] for e in c.events].count("calibration_jump") == 1
    second = c.live_vs_predicted(planned, now[0])
    for rid, r in second["replicas"].items():
        assert r["predicted"]["itl_mean_ms"] > 1.05 * first["replicas"][rid]["predicted"][
            "itl_mean_ms"]
