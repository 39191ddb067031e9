"""`make demo` / `lorafleet demo`: the whole loop on real vLLM (CPU build) with a tiny model.

1. ``lorafleet tiny-model``: a random-weight Llama + LoRA adapters (no downloads, ~1 s);
2. ``lorafleet plan`` the bundled CPU workload with the machine's profile (``tiny-llama-cpu``),
   every group verified by a twin run;
3. deploy the plan with real vLLM replicas on a private local Ray head (control/deploy.py);
4. drive it open loop with the workload's own requests for a short window
   (load_tests/openloop.py, the twin's metric definitions);
5. print, per replica, measured vs the twin's replay of exactly the requests sent (and the
   plan's one-hour prediction beside), then shut everything down (the head this job started,
   by PID - a failure on the way still shuts down).

``lorafleet demo --twin-only`` is the earlier job: a measured H100 hour vs the twin's replay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from orchestrator.cli import output

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_WORKLOAD = REPO_ROOT / "examples" / "workload_cpu_busy.yaml"
DEMO_OUT = Path("out/demo")
ROWS = (  # (label, measured key, predicted key, format)
    ("total throughput (tok/s)", "total_throughput_tps", "total_throughput_tps", "{:,.1f}"),
    ("TTFT p50 (ms)", "ttft_median_ms", "ttft_p50_ms", "{:,.1f}"),
    ("TTFT p99 (ms)", "ttft_p99_ms", "ttft_p99_ms", "{:,.1f}"),
    ("ITL p50 (ms)", "itl_median_ms", "itl_p50_ms", "{:,.2f}"),
    ("ITL p99 (ms)", "itl_p99_ms", "itl_p99_ms", "{:,.2f}"),
    ("starved", "starved", "starved", "{}"),
)  # the plan's figures are per replica-hour at the nominal rates


def add_arguments(p: argparse.ArgumentParser, *, twin_only: Callable[[argparse.Namespace], int]
                  ) -> None:
    """Register the demo's options; ``twin_only`` is the earlier (H100 replay) job."""
    p.add_argument("--twin-only", action="store_true",
                   help="only the twin job: a measured H100 hour vs its replay (no serving)")
    p.add_argument("--workload", default=str(DEMO_WORKLOAD), help="workload to plan and serve")
    p.add_argument("--duration", type=float, default=60.0, help="open-loop window (s)")
    p.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    p.add_argument("--out", default=str(DEMO_OUT), help="working folder")
    p.add_argument("--predictor", default="analytic", choices=("analytic", "twin", "surrogate"))
    p.set_defaults(func=lambda a: twin_only(a) if a.twin_only else cmd_demo(a))


def _cli(*args: str) -> None:
    """A lorafleet subcommand in a child (its own output, our exit on failure)."""
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=Path.cwd(),
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"lorafleet {' '.join(args)} failed:\n{res.stderr[-3000:]}"
                           f"{res.stdout[-2000:]}")


def _err(m: Any, p: Any) -> str:
    if isinstance(m, float) and isinstance(p, float) and p and math.isfinite(m):
        return f"{(p - m) / m * 100:+.1f} %" if m else "-"
    return "-"


def comparison_table(title: str, measured: dict[str, Any], replayed: dict[str, Any],
                     engine_alone: dict[str, Any], predicted: Any) -> Table:
    """Measured vs replayed (same requests; error = replayed / measured - 1), the same replay
    without the serving path (the engine alone), and the plan's hour."""
    tab = Table(title=title, header_style="bold")
    for col in ("metric", "measured", "replayed", "error", "engine alone", "error",
                "plan (1 h)"):
        tab.add_column(col, justify="left" if col == "metric" else "right")
    for label, mk, pk, fmt in ROWS:
        m, r, e = measured.get(mk), replayed.get(mk), engine_alone.get(mk)
        tab.add_row(label, _fmt(fmt, m), _fmt(fmt, r), _err(m, r), _fmt(fmt, e), _err(m, e),
                    _fmt(fmt, predicted.get(pk)))
    return tab


def _fmt(fmt: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    from load_tests.openloop import build_openloop_row, run_openloop
    from orchestrator.cli.deploy import print_controller
    from orchestrator.control.controller import ControllerSettings
    from orchestrator.control.deploy import DeployError, controller_status, local_deployment
    from orchestrator.measure.bench import append_row
    from orchestrator.measure.replay import replay_window
    from orchestrator.serving.spec import ServingSpec
    from placement.plan import Plan
    from twin.profile import load_profile
    from twin.workload import Workload

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    console, err = output.console, output.err_console
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    workload = Workload.from_yaml(args.workload)
    n_adapters = len(workload.adapters)
    t = time.perf_counter()
    with err.status("tiny model..."):
        _cli("tiny-model", str(out / "tiny"), "--adapters", str(n_adapters), "--ranks", "8,16",
             "--force")
    timings["tiny_model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with err.status(f"planning {workload.name} ({args.predictor} predictor, twin-verified)..."):
        _cli("plan", args.workload, "--profile", "tiny-llama-cpu", "--predictor",
             args.predictor, "--verify", "--verify-duration", str(max(120.0, args.duration)),
             "-o", str(out / "plan.yaml"))
    timings["plan_s"] = time.perf_counter() - t
    plan = Plan.from_yaml(out / "plan.yaml")
    groups = ", ".join(f"{g.name} x{g.copies}: {len(g.adapters)} adapters" for g in plan.groups)
    err.print(f"plan: {plan.replicas} replica(s) for {n_adapters} adapters, "
              f"{workload.total_rate_rps:.2f} req/s offered ({groups})", highlight=False)
    spec = ServingSpec.from_args({"plan_path": str(out / "plan.yaml"), "engine": args.engine,
                                  "model": str(out / "tiny")})
    down: dict[str, Any] = {}
    t = time.perf_counter()
    try:
        # the controller watches (drift, live vs twin) but applies nothing: the demo measures
        # the plan it deployed
        with err.status("deploying...") as status, local_deployment(
                spec, out / "state", settings=ControllerSettings(auto_apply=False),
                progress=lambda m: status.update(m), shut_down=down.update) as state:
            timings["deploy_s"] = time.perf_counter() - t
            status.stop()
            err.print(f"deployed {len(state.replicas)} {args.engine} replica(s) at {state.url} "
                      f"in {timings['deploy_s']:.1f} s (Ray head pid {state.head['pid']})",
                      highlight=False)
            res = asyncio.run(run_openloop(
                workload, state.url, args.duration, seed=0,
                progress=lambda m: err.print(f"  {m}", highlight=False)))
            with contextlib.suppress(Exception):  # the controller's view is a bonus
                ctl = controller_status(state)
                if ctl:
                    print_controller(console, ctl)
            t = time.perf_counter()
    except DeployError as exc:
        err.print(f"[bold red]deploy failed:[/] {exc}")
        return 1
    finally:
        if down:
            timings["shutdown_s"] = time.perf_counter() - t
            left = down.get("leftover_pids") or []
            err.print(f"shut down in {timings['shutdown_s']:.1f} s; "
                      + (f"[red]leftover pids {left}[/]" if left else "no processes left"))
    row = build_openloop_row(res, url=state.url, seed=0, model_name="tiny-llama-cpu",
                             plan_path=str(out / "plan.yaml"))
    append_row(out / "runs.csv", row)
    if res.errors:
        err.print(f"{len(res.errors)} request(s) failed; first: {res.errors[0]}")
    profile = load_profile(plan.profile.name)
    replay = replay_window(res, plan, profile, seed=0)
    alone = replay_window(res, plan, profile.with_serving_path(None), seed=0)
    if profile.serving_path is None:
        err.print(f"[yellow]profile {profile.name} has no serving-path term: the twin times the "
                  "engine alone (lorafleet profile --serving-path)[/]")
    source = plan.metrics_source()
    for g in plan.groups:
        pred = g.verified if source == "verified" and g.verified else g.predicted
        for c in range(g.copies):
            rid = f"{g.name}/{c}"
            console.print(comparison_table(
                f"replica {rid} ({args.engine}, {len(g.adapters)} adapters, max_loras "
                f"{g.engine.max_loras}): {args.duration:g} s measured vs the twin's replay of "
                f"the same requests, and the plan's {source} hour",
                res.per_replica.get(rid, {}), replay.per_replica.get(rid, {}),
                alone.per_replica.get(rid, {}), pred))
    m = res.metrics
    console.print(
        f"all replicas: {m['completed']} of {m['offered_requests']} requests completed, "
        f"{m['total_throughput_tps']:,.1f} tok/s, TTFT p50 {m['ttft_median_ms']:.1f} ms, "
        f"ITL p50 {m['itl_median_ms']:.2f} ms; row appended to {out / 'runs.csv'}",
        highlight=False)
    console.print("timings: " + json.dumps({k: round(v, 1) for k, v in timings.items()}),
                  highlight=False)
    return 0
