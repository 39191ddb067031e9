"""The closed loop on Ray Serve with ``sim`` replicas (real Ray, real Serve, the real controller
actor): an open-loop load shifts its hot adapters, doubles, then halves; the controller re-plans
from the replicas' telemetry, scales up and moves adapters, scales down, and not one request
fails. Then: an engine replica killed under load (retried or an explicit 503, never a hang, and
replaced), a controller restart that recovers the fleet from the replicas, `whatif`."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import Counter

import pytest

from load_tests.phases import (
    SHIFT_IDS,
    SHIFT_RATE,
    SHIFT_START_HOT,
    Phase,
    PhaseRun,
    drive_phases,
    hot_workload,
    shift_phases,
)
from orchestrator.control.controller import ControllerSettings
from orchestrator.control.drift import DriftConfig
from placement.context import PlacementContext
from placement.planner import make_plan
from placement.predictors import make_predictor
from twin.profile import load_profile
from twin.workload import Workload

pytestmark = pytest.mark.integration

IDS = list(SHIFT_IDS)
SETTINGS = ControllerSettings(
    window_s=20.0, min_span_s=6.0, check_interval_s=1.0, gap_interval_s=30.0,
    verify_window_s=120.0, replan_cooldown_s=8.0, ack_timeout_s=20.0, drain_timeout_s=60.0,
    settle_s=4.0, queue_min_s=15.0, drift=DriftConfig(gap=0.5, change_min_s=4.0),
)
PHASE_S = 30.0  # the two first phases; the doubled and halved ones last until the fleet moved
MOVE_MAX_S = 420.0  # ... or this long: a controller that has not moved by then is wrong


def shifted_hot(plan) -> list[str]:
    """Two adapters the starting plan put on the same replica: the hot set moves there."""
    return list(plan.groups[-1].adapter_ids[-2:])


@pytest.fixture(scope="module")
def fleet(ray_cluster, tmp_path_factory):
    import ray
    from ray import serve

    from orchestrator.control.actor import start_controller
    from orchestrator.serving.spec import ServingSpec

    profile = load_profile("tiny-llama-cpu").with_serving_path(None)  # sim engines
    ctx = PlacementContext.for_profile(profile, make_predictor("analytic", profile))
    plan = make_plan(hot_workload(SHIFT_START_HOT, SHIFT_RATE), ctx)
    assert plan.replicas == 2  # the scenario below is built on this starting point
    path = tmp_path_factory.mktemp("ctl") / "plan.yaml"
    plan.to_yaml(path)
    spec = ServingSpec.from_args({"plan_path": str(path), "engine": "sim"})
    actor = start_controller(spec, SETTINGS, name="test-controller")
    yield actor, plan, ray_cluster.url
    try:
        ray.get(actor.shutdown.remote(), timeout=120)
    finally:
        ray.kill(actor, no_restart=True)
        serve.delete("lorafleet")


def drive(url: str, phases: list[Phase | tuple[Workload, float]], seed: int = 0
          ) -> tuple[Counter, list[tuple[float, int, str]], PhaseRun]:
    """Open-loop Poisson load, phase after phase (load_tests/phases.py); returns status counts,
    (seconds since the start, status, replica) per request, and the run."""
    run = asyncio.run(drive_phases(url, phases, seed=seed))
    t0 = run.phase_starts[0]
    return run.statuses, [(t - t0, s, rep) for t, s, rep in run.sent], run


def events(actor) -> list[dict]:
    import ray

    return ray.get(actor.status.remote(1000))["events"]


def settle(actor, timeout_s: float = 180.0) -> None:
    """Wait until no transition is running or decided but not yet carried out: a re-plan made
    under the load's last seconds may still be moving the fleet when the load stops."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = ray.get(actor.status.remote(1000))
        kinds = [(e["kind"], e.get("apply")) for e in st["events"]]
        last_apply = max((i for i, k in enumerate(kinds) if k == ("replan", True)), default=-1)
        last_move = max((i for i, (k, _) in enumerate(kinds)
                         if k in ("transition", "transition_failed")), default=-1)
        if not st["busy"] and last_move >= last_apply:
            return
        time.sleep(1.0)
    raise AssertionError(f"the controller did not settle within {timeout_s:.0f} s")


def grew(actor, since: float, replicas: int) -> bool:
    """Has a transition after wall time ``since`` ended with more than ``replicas``?"""
    return any(e["kind"] == "transition" and e["t"] >= since and e["replicas"] > replicas
               for e in events(actor))


def shrank(actor, since: float) -> bool:
    """Has a transition after wall time ``since`` ended below the peak an earlier one reached?"""
    sizes = [e["replicas"] for e in events(actor) if e["kind"] == "transition"
             and e["t"] >= since]
    top = sizes.index(max(sizes)) if sizes else 0
    return any(n < sizes[top] for n in sizes[top + 1:])


def test_shift_double_halve_replans_with_zero_failed_requests(fleet) -> None:
    import ray

    actor, plan, url = fleet
    hot = shifted_hot(plan)
    wall0 = time.time()
    # as planned -> the hot set moves -> the total rate doubles -> then halves. The doubled
    # phase lasts until the fleet has grown, the halved one until it has shrunk (each at least
    # a window and a decision): on a slow host engines start in tens of seconds, and a fixed
    # phase would end before the transition its load asked for (the assertions say whether it
    # happened; the phases only wait for it)
    first, moved, doubled, halved = shift_phases(hot, PHASE_S)
    counts, results, run = drive(url, [
        first, moved,
        Phase(*doubled, until=functools.partial(grew, actor, wall0, plan.replicas),
              max_s=MOVE_MAX_S),
        Phase(*halved, until=functools.partial(shrank, actor, wall0), max_s=MOVE_MAX_S)])
    settle(actor)
    ev = [e for e in events(actor) if e["t"] >= wall0]
    for e in ev:  # the run's timeline, shown with -s
        print(f"{e['t'] - wall0:7.1f} {e['kind']:<11} " + json.dumps(
            {k: v for k, v in e.items() if k in ("reasons", "reason", "replicas", "started",
                                                   "stopped", "seconds", "phases", "error")},
            default=str)[:400])
    assert counts == Counter({200: len(results)}), counts  # zero failed requests

    transitions = [e for e in ev if e["kind"] == "transition"]
    assert transitions, "the controller never moved the fleet"
    up = [e for e in transitions if e["started"] > 0 and e["replicas"] > plan.replicas]
    assert up, "no scale-up after the rate doubled"
    assert any(e["adapters_placed_anew"] > 0 for e in transitions)
    peak = max(e["replicas"] for e in transitions)
    down = [e for e in transitions if e["t"] > up[0]["t"] and e["replicas"] < peak]
    checks = [{"t": round(c["t"] - wall0, 1), "rps": c.get("estimated_rps"),
               "span": c.get("span_s"), "why": c.get("decision") or c.get("drift")
               or c.get("why")} for c in ray.get(actor.history.remote(run.phase_starts[3]))[::3]]
    assert down and down[-1]["stopped"] > 0, f"no scale-down after the load halved: {checks}"
    drifts = [e for e in ev if e["kind"] == "drift"]
    assert any("hot set" in r or "rate" in r for e in drifts for r in e["reasons"])

    status = ray.get(actor.status.remote())
    assert status["replicas"] < peak
    assert len(status["members"]) == status["replicas"]  # retired engines are gone
    # timeline from the moment the rate doubled to the first transition after it
    doubled_at = run.phase_starts[2]
    first = min((e for e in drifts if e["t"] >= doubled_at), key=lambda e: e["t"])
    moved = min((e for e in transitions if e["t"] >= first["t"]), key=lambda e: e["t"])
    plans = [e for e in ev if e["kind"] == "replan" and first["t"] <= e["t"] <= moved["t"]]
    print("timeline after the rate doubled:", json.dumps({
        "detection_delay_s": round(first["t"] - doubled_at, 1),
        "replan_s": [p["seconds"] for p in plans],
        "first_transition": {k: moved[k] for k in ("seconds", "phases", "replicas", "started",
                                                   "stopped", "adapters_placed_anew")},
        "scaled_up_after_s": round(up[0]["t"] - doubled_at, 1),
        "failed_requests": len(results) - counts[200], "requests": len(results)}))


def engine_actor(endpoint: str):
    """The Ray actor of the one Serve replica of an engine application (Serve names replica
    actors ``SERVE_REPLICA::<app>#<deployment>#<id>`` in its namespace)."""
    import ray

    found = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve"
             and a["name"].startswith(f"SERVE_REPLICA::{endpoint}#engine#")]
    assert len(found) == 1, found
    return ray.get_actor(found[0]["name"], namespace="serve")


def live_engine(actor, timeout_s: float = 120.0):
    """(endpoint, actor) of a member engine that is running now: a transition decided from the
    load before (a scale-down) may retire the first one read, so read again once it settled."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        settle(actor)
        members = ray.get(actor.status.remote())["members"]
        for endpoint in sorted(members):
            try:
                return endpoint, engine_actor(endpoint)
            except AssertionError:
                continue
        assert time.monotonic() < deadline, f"no member engine is running: {members}"
        time.sleep(2)


def test_killed_replica_and_restarted_controller_lose_no_request_silently(fleet) -> None:
    """Under load: an engine replica is killed (its requests end 200 or an explicit 503, none
    hangs; Serve replaces it and it serves again), then the controller is killed and Ray
    restarts it (it recovers the fleet from the replicas; traffic never notices); `whatif`
    answers from the live estimate without applying anything."""
    import concurrent.futures

    import ray

    actor, plan, url = fleet
    settle(actor)
    load = hot_workload(shifted_hot(plan), SHIFT_RATE)  # what the fleet was last sized for
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(drive, url, [(load, 40.0)], 7)
        time.sleep(10)
        victim, handle = live_engine(actor)
        before = ray.get(actor.status.remote())  # the fleet the kill and the restart hit
        members = before["members"]
        victim_replica = members[victim]["replica"]
        ray.kill(handle, no_restart=False)
        deadline = time.time() + 60  # Serve replaces it; its telemetry comes from a new process
        while not any(e["kind"] == "replica_replaced" and e["endpoint"] == victim
                      for e in events(actor)):
            assert time.time() < deadline, "no replica_replaced event for the killed replica"
            time.sleep(1)
        ray.kill(actor, no_restart=False)  # Ray restarts the detached controller
        deadline = time.time() + 90
        after: dict = {}
        while True:
            try:
                after = ray.get(actor.status.remote(), timeout=10)
                if any(e["kind"] == "recovered" for e in after["events"]):
                    break
            except Exception:
                pass
            assert time.time() < deadline, f"the restarted controller did not recover: {after}"
            time.sleep(1)
        counts, results, _ = running.result(timeout=400)
    print("killed replica + restarted controller:", dict(counts), "requests:", len(results),
          "recovered:", [e for e in after["events"] if e["kind"] == "recovered"])
    assert set(counts) <= {200, 503}, counts  # explicit statuses only: nothing hung or reset
    assert counts[200] >= 0.9 * len(results), counts
    late = [s for t, s, rep in results if t > 25.0]
    assert late and all(s == 200 for s in late)  # the replaced replica serves again
    assert after["version"] == before["version"] and set(after["members"]) == set(members)
    assert after["members"][victim]["replica"] == victim_replica
    # the history survived the restart (Ray's key-value store), and says Serve replaced the
    # killed replica (its telemetry came from a new process)
    history = ray.get(actor.status.remote(1000))["events"]
    kinds = [e["kind"] for e in history]
    assert "deployed" in kinds and kinds.index("replica_replaced") < kinds.index("recovered")


def test_whatif_answers_from_the_live_estimate_without_applying(fleet) -> None:
    import concurrent.futures

    import ray

    actor, plan, url = fleet
    load = hot_workload(shifted_hot(plan), SHIFT_RATE)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(drive, url, [(load, 25.0)], 11)
        time.sleep(18)
        before = ray.get(actor.status.remote())
        more = ray.get(actor.whatif.remote(rate_scale=3.0), timeout=300)
        fewer = ray.get(actor.whatif.remote(remove=IDS[8:]), timeout=300)
        counts, _, _ = running.result(timeout=300)
    assert more["replicas"] > before["replicas"] and more["workload"]["total_rate_rps"] > 15
    assert fewer["workload"]["adapters"] == 8 and fewer["plan"]["routing"].keys() == set(IDS[:8])
    after = ray.get(actor.status.remote())  # neither answer became the deployed plan
    assert set(after["plan"]["routing"]) == set(IDS) and after["replicas"] < more["replicas"]
    assert set(counts) == {200}
    # registering through the actor stamps every engine (a restart must still know the adapter)
    from orchestrator.serving.registry import AdapterEntry

    assert ray.get(actor.register.remote([AdapterEntry("zz", 8, uri="sim://zz")]),
                   timeout=120) == ["zz"]
    assert any(e["kind"] == "registered" and e["adapters"] == ["zz"] for e in events(actor))
