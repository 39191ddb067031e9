"""The closed loop under a shifting load: real Ray Serve, sim engines, the real controller.

A private Ray head (``--num-cpus``, default 4) runs the plan for the shift scenario's first
phase (16 adapters on the tiny CPU profile, analytic predictor) with ``sim`` engines and the
controller actor; an open-loop client then drives the four phases of
``load_tests.phases.shift_phases``: as planned -> the hot set moves -> the rate doubles -> it
halves, sending to the ingress's own listener as ``lorafleet deploy`` serves it (``--via
proxy``: through Serve's HTTP proxy). Afterwards the controller's check records and events are
read back and judged:

* ``checks``: per check, its time since the run started, the phase, the client's ``offered_rps``
  over the span the estimate rests on, the controller's ``estimated_rps``, the fleet's replicas;
* ``max_rate_error``: the largest |estimated / offered - 1| over checks whose span holds at least
  10 s of traffic after the last step (``rate_errors_p50``, ``_p90`` beside it);
* per phase: ``twin_needed`` (the replicas the controller's own re-plan rule sizes for the
  phase's nominal workload with no current plan), ``replicas_max`` and ``replicas_end``,
  ``transitions`` and ``seconds_to_settle`` (the phase start to the end of its last transition);
* ``transitions_in_stationary_phases``: transitions beyond the one each changed phase needs
  (any in the first phase, more than one in the others);
* ``failed_requests`` (anything but 200) and ``requests``.

Targets (issue #16): max_rate_error <= 0.15; replicas never above twin_needed + 1 and equal to
it at the end of each phase; no transition in stationary phases; no failed request.

    python benchmarks/controller_shift.py [--phase-s 40] [--seed 0] [--num-cpus 4]
        [--window-s 20] [--via listener|proxy] [--out timeline.json]

Prints one JSON line (the timeline too with ``--out``). Takes about phase_s x 5 + 90 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from load_tests.phases import (  # noqa: E402
    SHIFT_RATE,
    SHIFT_START_HOT,
    PhaseRun,
    drive_phases,
    hot_workload,
    shift_phases,
)
from orchestrator.control.controller import ControllerSettings  # noqa: E402
from orchestrator.control.drift import DriftConfig  # noqa: E402
from orchestrator.control.replan import ReplanConfig, replan  # noqa: E402
from placement.context import PlacementContext  # noqa: E402
from placement.planner import make_plan  # noqa: E402
from placement.predictors import make_predictor  # noqa: E402
from placement.verify import verify_plans  # noqa: E402
from twin.profile import load_profile  # noqa: E402

POST_STEP_S = 10.0  # checks judged for the rate error rest on at least this much post-step time
SETTLE_TIMEOUT_S = 180.0


def settings(window_s: float) -> ControllerSettings:
    """The loop's knobs for a minutes-long scenario (the integration test uses the same)."""
    return ControllerSettings(
        window_s=window_s, min_span_s=8.0, check_interval_s=1.0, gap_interval_s=30.0,
        verify_window_s=120.0, replan_cooldown_s=8.0, ack_timeout_s=20.0, drain_timeout_s=60.0,
        settle_s=5.0, queue_min_s=20.0, drift=DriftConfig(change_min_s=4.0))


def twin_needed(ctx: PlacementContext, s: ControllerSettings, workloads: list) -> list[int]:
    """What the controller's own rule sizes for each phase's nominal workload from scratch."""
    from functools import partial

    verify = partial(verify_plans, profile=ctx.profile, duration_s=s.verify_window_s, workers=1)
    return [replan(w, ctx, None, s.replan or ReplanConfig(), verify).plan.replicas
            for w in workloads]


def fleet_timeline(events: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """(time, replicas) whenever the fleet changed: the deploy, then each transition's end."""
    return [(e["t"], int(e["replicas"])) for e in events
            if e["kind"] in ("deployed", "transition")]


def replicas_at(timeline: list[tuple[float, int]], t: float) -> int:
    n = timeline[0][1]
    for when, k in timeline:
        if when <= t:
            n = k
    return n


def judge(run: PhaseRun, checks: list[dict[str, Any]], events: list[dict[str, Any]],
          needed: list[int]) -> dict[str, Any]:
    """The benchmark's figures from what was sent and what the controller recorded."""
    t0 = run.phase_starts[0]
    fleet = fleet_timeline(events)
    rows, errors = [], []
    for c in checks:
        if c["t"] < t0 or "estimated_rps" not in c:
            continue
        k = run.phase_of(c["t"])
        span = float(c["span_s"])
        offered = run.offered_rps(c["t"] - span, c["t"])
        est = float(c["estimated_rps"])
        post = min(span, c["t"] - run.phase_starts[k])
        row = {"t": round(c["t"] - t0, 1), "phase": k, "span_s": span,
               "offered_rps": round(offered, 3), "estimated_rps": round(est, 3),
               "replicas": replicas_at(fleet, c["t"]), "post_step_s": round(post, 1)}
        for key in ("engine_arrivals_rps", "engine_finished_rps", "engine_waiting",
                    "ingress_in_flight", "ingress_sources"):
            if key in c:
                row[key] = c[key]
        if c.get("drift"):
            row["drift"] = c["drift"]
        if c.get("decision"):
            row["decision"] = c["decision"][:160]
        rows.append(row)
        if post >= POST_STEP_S and offered > 0:
            errors.append(abs(est / offered - 1.0))
    phases = []
    extra = 0
    for k, (start, end) in enumerate(zip(run.phase_starts, run.phase_ends, strict=True)):
        moves = [e for e in events if e["kind"] == "transition" and start <= e["t"] < end]
        sizes = [n for t, n in fleet if t < end]
        in_phase = [n for t, n in fleet if start <= t < end] + [replicas_at(fleet, start)]
        phases.append({
            "phase": k, "twin_needed": needed[k], "replicas_max": max(in_phase),
            "replicas_end": sizes[-1] if sizes else None, "transitions": len(moves),
            "seconds_to_settle": round(max(e["t"] for e in moves) - start, 1) if moves else 0.0,
        })
        extra += len(moves) if k == 0 else max(0, len(moves) - 1)
    return {
        "max_rate_error": round(max(errors), 4) if errors else None,
        "rate_errors_p50": round(float(np.percentile(errors, 50)), 4) if errors else None,
        "rate_errors_p90": round(float(np.percentile(errors, 90)), 4) if errors else None,
        "rate_checks": len(errors),
        "phases": phases,
        "replicas_within_need_plus_one": all(p["replicas_max"] <= p["twin_needed"] + 1
                                             for p in phases),
        "replicas_end_equal_need": all(p["replicas_end"] == p["twin_needed"] for p in phases),
        "transitions_in_stationary_phases": extra,
        "failed_requests": run.failed, "requests": len(run.sent),
        "checks": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase-s", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=float, default=4.0)
    ap.add_argument("--window-s", type=float, default=20.0)
    ap.add_argument("--out", default=None, help="write the whole timeline (JSON) here")
    ap.add_argument("--via", choices=("listener", "proxy"), default="listener",
                    help="send to the ingress's own listener (what `lorafleet deploy` prints, "
                    "default) or through Serve's HTTP proxy")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    from ray import serve

    from orchestrator.control.actor import start_controller
    from orchestrator.control.cluster import LocalHead, connect, free_port
    from orchestrator.serving.spec import ServingSpec

    profile = load_profile("tiny-llama-cpu").with_serving_path(None)  # sim engines
    ctx = PlacementContext.for_profile(profile, make_predictor("analytic", profile))
    s = settings(args.window_s)
    plan = make_plan(hot_workload(SHIFT_START_HOT, SHIFT_RATE), ctx)
    moved = list(plan.groups[-1].adapter_ids[-2:])  # two adapters the plan put together
    phases = shift_phases(moved, args.phase_s)
    needed = twin_needed(ctx, s, [w for w, _ in phases])
    tmp = Path(tempfile.mkdtemp(prefix="lf-shift-"))
    plan.to_yaml(tmp / "plan.yaml")
    head = LocalHead.start(num_cpus=args.num_cpus, log_dir=tmp / "head")
    t_start = time.time()
    try:
        connect(head.address)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        listen = free_port() if args.via == "listener" else None
        spec = ServingSpec.from_args({"plan_path": str(tmp / "plan.yaml"), "engine": "sim",
                                      **({"listen": f"127.0.0.1:{listen}"} if listen else {})})
        actor = start_controller(spec, s, name="shift-controller")
        url = f"http://127.0.0.1:{listen or port}"
        print(f"deployed {plan.replicas} replicas; driving {len(phases)} phases at {url} "
              f"({args.via})", file=sys.stderr)
        run = asyncio.run(drive_phases(url, phases, seed=args.seed))
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while ray.get(actor.status.remote())["busy"] and time.monotonic() < deadline:
            time.sleep(1.0)
        checks = ray.get(actor.history.remote(run.phase_starts[0] - 1.0))
        events = ray.get(actor.status.remote(1000))["events"]
        ray.get(actor.shutdown.remote(), timeout=120)
        ray.kill(actor, no_restart=True)
    finally:
        ray.shutdown()
        head.stop()
    out = judge(run, checks, events, needed)
    timeline = {"checks": out.pop("checks"),
                "events": [{**e, "t": round(e["t"] - run.phase_starts[0], 1)} for e in events
                           if e["kind"] in ("drift", "replan", "transition", "capacity",
                                            "calibration_gap", "twin_local")]}
    line = {"benchmark": "controller_shift", "phase_s": args.phase_s, "seed": args.seed,
            "window_s": args.window_s, "num_cpus": args.num_cpus, "via": args.via,
            "plan_replicas": plan.replicas, **out,
            "wall_s": round(time.time() - t_start, 1),
            "load_1m": round(os.getloadavg()[0], 2)}
    if args.out:
        Path(args.out).write_text(json.dumps({**line, **timeline}, indent=1, default=str))
    print(json.dumps(line, default=lambda x: None if isinstance(x, float) and math.isnan(x)
                     else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
