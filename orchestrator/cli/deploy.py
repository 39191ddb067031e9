"""`lorafleet deploy | status | shutdown`: the serving path's command line (docs/serving.md)."""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.cli import output


def add_parser(subparsers: Any) -> None:
    d = subparsers.add_parser(
        "deploy", help="serve a plan on Ray Serve: OpenAI-compatible ingress + engine replicas",
        description="Deploy PLAN (from `lorafleet plan`) on Ray Serve: one engine deployment "
        "per replica copy (vLLM or the real-time sim) and an OpenAI-compatible ingress routing "
        "by adapter id. Without --address a private local Ray head is started and kept running "
        "after this command exits; `lorafleet shutdown` stops it.",
    )
    d.add_argument("plan", help="plan YAML (docs/plan_format.md)")
    d.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    d.add_argument("--model", default=None,
                   help="tiny-model directory (adapters.yaml inside) or base model path")
    d.add_argument("--adapter-registry", default=None,
                   help="adapter registry YAML (default: MODEL/adapters.yaml)")
    d.add_argument("--adapter-root", action="append", default=None,
                   help="allowed folder for local adapter paths (repeatable; default: the "
                   "registry's folder)")
    d.add_argument("--api-keys", default=None,
                   help="API keys YAML (orchestrator/serving/api_keys.py)")
    d.add_argument("--port", type=int, default=8000,
                   help="HTTP port the ingress listens on itself (the API's URL)")
    d.add_argument("--serve-port", type=int, default=None,
                   help="port of Ray Serve's HTTP proxy, which serves the same API with one "
                   "hop more (default: a free port)")
    d.add_argument("--address", default=None,
                   help="Ray cluster address (`ray up` head); default: start a local head")
    d.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray head")
    d.add_argument("--no-dashboard", action="store_true",
                   help="start the local Ray head without its dashboard (then `ray list`, "
                   "`serve status` and the dashboard UI do not work)")
    d.add_argument("--dashboard-port", type=int, default=None,
                   help="port of the local head's Ray dashboard (default: a free port)")
    d.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs reserved per engine replica (default 0.5 vllm, 0.05 sim)")
    d.add_argument("--replica-gpus", type=float, default=None,
                   help="GPUs per engine replica (default: --tensor-parallel-size on a cluster "
                   "with GPUs, 0 on a CPU-only one)")
    d.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="GPUs one vLLM engine spans (default 1)")
    d.add_argument("--accelerator-type", default=None,
                   help="GPU type the engine replicas run on, as Ray names it (H100, A100, "
                   "A10G, L4, ...)")
    d.add_argument("--wait-for-gpus", action="store_true",
                   help="deploy even if the cluster has fewer GPUs than the plan needs now "
                   "(an autoscaling cluster adds them; replicas wait)")
    d.add_argument("--max-model-len", type=int, default=None)
    d.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body the ingress accepts (413 above it; default "
                   "2 MiB, at most 4 MiB less 64 KiB: Ray's message limit)")
    d.add_argument("--state-dir", default=None,
                   help="where deploy.json is kept (default .lorafleet or $LORAFLEET_STATE_DIR)")
    c = d.add_argument_group("controller (docs/controller.md)")
    c.add_argument("--predictor", default=None, choices=("surrogate", "analytic", "twin"),
                   help="predictor re-plans use (default: the one the plan was made with)")
    c.add_argument("--control-window", type=float, default=60.0,
                   help="sliding telemetry window the workload is estimated over (s)")
    c.add_argument("--check-interval", type=float, default=5.0,
                   help="seconds between drift checks")
    c.add_argument("--verify-window", type=float, default=600.0,
                   help="simulated seconds of each twin verification run of a re-plan")
    c.add_argument("--observe-only", action="store_true",
                   help="detect drift and re-plan, but never apply a plan")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_deploy)

    s = subparsers.add_parser("status", help="replicas, adapters held, live vs predicted")
    s.add_argument("--window", type=float, default=60.0, help="telemetry window (s)")
    s.add_argument("--state-dir", default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    x = subparsers.add_parser("shutdown", help="stop the deployment (and the head deploy started)")
    x.add_argument("--state-dir", default=None)
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_shutdown)


def builder_args(args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.serving.api_keys import ApiKeys

    out: dict[str, Any] = {"plan_path": args.plan, "engine": args.engine}
    if args.model:
        out["model"] = args.model
    if args.adapter_registry:
        out["adapter_registry"] = args.adapter_registry
    if args.adapter_root:
        out["adapter_roots"] = list(args.adapter_root)
    if args.api_keys:
        out["api_keys"] = ApiKeys.from_yaml(args.api_keys).to_dict()
    if args.replica_cpus is not None:
        out["replica_cpus"] = args.replica_cpus
    if args.replica_gpus is not None:
        out["replica_gpus"] = args.replica_gpus
    if args.tensor_parallel_size is not None:
        out["tensor_parallel_size"] = args.tensor_parallel_size
    if args.accelerator_type:
        out["accelerator_type"] = args.accelerator_type
    if args.max_model_len:
        out["max_model_len"] = args.max_model_len
    if args.max_body_bytes:
        out["max_body_bytes"] = args.max_body_bytes
    return out


def controller_settings(args: argparse.Namespace) -> Any:
    from orchestrator.control.controller import ControllerSettings

    window = args.control_window
    return ControllerSettings(window_s=window, min_span_s=min(20.0, window / 3),
                              check_interval_s=args.check_interval,
                              verify_window_s=args.verify_window, predictor=args.predictor,
                              auto_apply=not args.observe_only)


def cmd_deploy(args: argparse.Namespace) -> int:
    from orchestrator.control.deploy import deploy
    from orchestrator.serving.spec import ServingSpec

    console, err = output.console, output.err_console
    spec = ServingSpec.from_args(builder_args(args))
    t0 = time.perf_counter()
    settings = controller_settings(args)
    with err.status("deploying...") as status:
        state = deploy(spec, address=args.address, port=args.port, serve_port=args.serve_port,
                       state_dir=args.state_dir,
                       num_cpus=args.num_cpus, settings=settings,
                       dashboard=not args.no_dashboard, dashboard_port=args.dashboard_port,
                       wait_for_gpus=args.wait_for_gpus, progress=lambda m: status.update(m))
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"url": state.url, "serve_url": state.serve_url,
                          "address": state.address, "dashboard_url": state.dashboard_url,
                          "engine": state.engine,
                          "replicas": state.replicas, "ready_s": elapsed}))
        return 0
    console.print(Text(
        f"deployed {spec.plan.workload.name}: {len(state.replicas)} {state.engine} replica(s) "
        f"({', '.join(state.replicas)}) in {elapsed:.1f} s\n"
        f"  OpenAI API  {state.url}/v1  (model = adapter id or {spec.base_model_name!r}; "
        f"also through Ray Serve's proxy at {state.serve_url}/v1)\n"
        f"  Ray         {state.address}\n"
        + (f"  dashboard   {state.dashboard_url}  (Serve tab, logs; `ray list actors "
           f"--address {state.dashboard_url}`, `serve status -a {state.dashboard_url}`)\n"
           if state.dashboard_url else "") +
        "  controller  re-plans from live telemetry (lorafleet status shows it; "
        "lorafleet whatif asks it)\n"
        "  next        lorafleet status | lorafleet whatif | lorafleet shutdown"), soft_wrap=True)
    return 0


def _f(v: Any, fmt: str = "{:,.1f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def status_rows(reports: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per replica: measured beside the plan's prediction (for tables and JSON)."""
    rows = []
    for rid, r in sorted(reports.items()):
        if "error" in r:
            rows.append({"replica": rid, "error": r["error"]})
            continue
        p = r.get("predicted") or {}
        rows.append({
            "replica": rid, "engine": r["engine"], "adapters": len(r["adapters"]),
            "running": r["running"], "waiting": r["waiting"],
            "request_rate_rps": r["request_rate_rps"],
            "throughput_tps": r["total_throughput_tps"],
            "predicted_throughput_tps": p.get("total_throughput_tps"),
            "ttft_p50_ms": r["ttft_p50_ms"], "predicted_ttft_p50_ms": p.get("ttft_p50_ms"),
            "itl_mean_ms": r["itl_mean_ms"], "predicted_itl_p50_ms": p.get("itl_p50_ms"),
            "errors": r["total_errors"], "requests": r["total_requests"],
        })
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.control.deploy import (
        DeployState,
        collect_reports,
        controller_status,
        state_path,
    )
    from placement.plan import Plan

    state = DeployState.read(state_path(args.state_dir))
    reports = collect_reports(state, args.window)
    ctl = controller_status(state)
    plan = Plan.from_dict(ctl["plan"]) if ctl else Plan.from_yaml(state.plan_path)
    planned = {(a.id, g.name): a.rate_rps for g in plan.groups for a in g.adapters}
    if args.json:
        print(json.dumps({"url": state.url, "engine": state.engine, "replicas": reports,
                          "rows": status_rows(reports), "controller": ctl}, default=str))
        return 0
    console = output.console
    if ctl:
        print_controller(console, ctl)
    t = Table(title=f"lorafleet {state.url} ({state.engine}) - measured vs plan's prediction, "
              f"last {args.window:g} s", header_style="bold")
    for c in ("replica", "adapters", "run/wait", "req/s", "tok/s", "pred tok/s",
              "TTFT p50 ms", "pred", "ITL ms", "pred", "errors"):
        t.add_column(c, justify="left" if c == "replica" else "right")
    for row in status_rows(reports):
        if "error" in row:
            t.add_row(row["replica"], f"[red]{row['error'][:60]}[/]")
            continue
        t.add_row(row["replica"], str(row["adapters"]), f"{row['running']}/{row['waiting']}",
                  _f(row["request_rate_rps"], "{:.2f}"), _f(row["throughput_tps"]),
                  _f(row["predicted_throughput_tps"]), _f(row["ttft_p50_ms"]),
                  _f(row["predicted_ttft_p50_ms"]), _f(row["itl_mean_ms"], "{:.2f}"),
                  _f(row["predicted_itl_p50_ms"], "{:.2f}"), str(row["errors"]))
    console.print(t)
    a = Table(title="per adapter: live arrival rate vs plan (req/s per replica)",
              header_style="bold")
    for c in ("adapter", "replica", "live req/s", "plan req/s", "TTFT p50 ms"):
        a.add_column(c, justify="left" if c in ("adapter", "replica") else "right")
    shown = 0
    for rid, r in sorted(reports.items()):
        live = r.get("adapters_live", {}) if "error" not in r else {}
        for aid, m in sorted(live.items()):
            if shown >= 40:
                break
            a.add_row(aid, rid, _f(m["rate_rps"], "{:.3f}"),
                      _f(planned.get((aid, rid.split("/")[0])), "{:.3f}"),
                      _f(m["ttft_p50_ms"]))
            shown += 1
    if shown:
        console.print(a)
    return 0


def print_controller(console: Console, ctl: dict[str, Any]) -> None:
    """The controller's view: plan version, last check, live vs the twin, recent events."""
    last = ctl.get("last_check") or {}
    lines = [f"controller: plan version {ctl['version']}, {ctl['replicas']} replica(s), "
             f"{ctl['ingresses']} ingress(es) polling; re-planning {ctl['replanning']}"]
    if last:
        lines.append(f"  last check: telemetry {last.get('telemetry')}"
                     + (f" ({last['why']})" if last.get("why") else "")
                     + (f"; drift: {'; '.join(last['drift'])}" if last.get("drift") else "")
                     + (f"; {last['decision']}" if last.get("decision") else ""))
    console.print(Text("\n".join(lines)), soft_wrap=True)
    gap = ctl.get("live_vs_predicted") or {}
    if gap.get("replicas"):
        t = Table(title=f"live vs twin for the observed workload ({gap['twin_window_s']:g} "
                  "simulated s per replica)", header_style="bold")
        for c in ("replica", "req/s", "tok/s", "twin tok/s", "gap", "TTFT mean ms",
                  "twin TTFT mean ms", "gap"):
            t.add_column(c, justify="left" if c == "replica" else "right")
        for rid, r in gap["replicas"].items():
            live, pred, g = r["live"], r["predicted"], r["gap"]
            t.add_row(rid, _f(live.get("request_rate_rps"), "{:.2f}"),
                      _f(live.get("total_throughput_tps")), _f(pred.get("total_throughput_tps")),
                      _f(g.get("throughput"), "{:+.0%}"), _f(live.get("ttft_mean_ms")),
                      _f(pred.get("ttft_mean_ms", pred.get("ttft_p50_ms"))),
                      _f(g.get("ttft"), "{:+.0%}"))
        console.print(t)
        cal = gap.get("calibration") or {}
        if cal:
            console.print(f"  online calibration: {cal.get('summary')}", highlight=False)
    elif gap.get("why"):
        console.print(f"  live vs twin: {gap['why']}")
    events = [e for e in ctl.get("events", []) if e["kind"] != "drift"][-8:]
    if events:
        t = Table(title="recent controller events", header_style="bold")
        for c in ("when", "event", "what"):
            t.add_column(c)
        for e in events:
            what = {k: v for k, v in e.items() if k not in ("t", "kind")}
            t.add_row(time.strftime("%H:%M:%S", time.localtime(e["t"])), e["kind"],
                      json.dumps(what, default=str)[:110])
        console.print(t)


def cmd_shutdown(args: argparse.Namespace) -> int:
    from orchestrator.control.deploy import shutdown

    err = output.err_console
    with err.status("shutting down...") as status:
        result = shutdown(args.state_dir, progress=lambda m: status.update(m))
    if args.json:
        print(json.dumps(result))
        return 0
    left = result.get("leftover_pids") or []
    apps = result.get("remaining_apps") or []
    deleted = result.get("deleted_apps")
    output.console.print(Text(
        f"shut down {result['address']}"
        + (f"; {len(deleted)} Serve application(s) deleted" if deleted is not None else "")
        + (f"; head pid {result['head_pid']} stopped" if result.get("head_pid") else "")
        + (f"; WARNING leftover pids {left}" if left else "; no processes left")
        + (f"; WARNING still running: {', '.join(apps)} (the deployment record is kept: run "
           "`lorafleet shutdown` again)" if apps else "")
        + (f"; {result['serve_error']}" if result.get("serve_error") else "")))
    return 0 if not left and not apps else 1
