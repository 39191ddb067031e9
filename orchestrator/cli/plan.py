"""`lorafleet plan`: placement + slots + routing + replica count for a workload. Thin: parse,
call ``placement.choose`` (the default: the plan the twin accepts), ``placement.planner``
(``--no-verify``: the predictor's plan alone) or ``placement.compare`` (``--compare``), print."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.table import Table

from orchestrator.cli import output
from orchestrator.cli.output import CLIError, print_json

MAX_TABLE_ROWS = 40


def add_parser(subparsers: Any) -> None:
    """Register `plan WORKLOAD --profile NAME [--policy P] [--compare] [--no-verify] ...`."""
    from placement.policy import POLICIES
    from placement.predictors import DEFAULT_PREDICTOR, DEFAULT_TWIN_WINDOW_S, PREDICTORS
    from placement.verify import VERIFY_DURATION_S

    p = subparsers.add_parser(
        "plan",
        help="place adapters on replicas: groups, max_loras, routing, replica count",
        description="Plan a fleet for WORKLOAD: which adapters share a replica, each replica's "
        "max_loras / max_cpu_loras / max_lora_rank, the routing table (hot adapters split over "
        "several replicas) and the replica count, next to a lower bound. Writes the plan YAML "
        "`lorafleet deploy` reads (docs/plan_format.md).",
    )
    p.add_argument("workload", help="workload YAML (docs/workload_format.md)")
    p.add_argument("--profile", required=True, help="profile name (`lorafleet profiles`) or YAML")
    p.add_argument("--policy", default="lorafleet",
                   help=f"placement policy: {', '.join(sorted(POLICIES))} (default lorafleet)")
    p.add_argument("--compare", action="store_true",
                   help="run every registered policy and verify each plan with full twin runs")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="verify every replica group of the plan with a full twin run (default; "
                        "lorafleet: re-planned tighter while the twin starves a replica, on fewer "
                        "replicas while it accepts fewer); --no-verify: the predictor's plan alone")
    p.add_argument("--gpu-budget", type=int, default=None, metavar="N",
                   help="error if the plan needs more than N replicas (says what N can serve)")
    p.add_argument("-o", "--output", default=None, help="write the plan YAML here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--predictor", choices=PREDICTORS, default=DEFAULT_PREDICTOR,
                   help="what placement predicts replicas with: surrogate (trained LightGBM, "
                   "default), analytic (closed form, rough), twin (exact, slow)")
    p.add_argument("--twin-window", type=float, default=DEFAULT_TWIN_WINDOW_S, metavar="S",
                   help="simulated seconds per prediction with --predictor twin")
    p.add_argument("--verify-duration", type=float, default=VERIFY_DURATION_S, metavar="S",
                   help="simulated seconds of each verification run (default one hour)")
    p.add_argument("--target-utilisation", type=float, default=1.0, metavar="U",
                   help="keep a margin: judge each replica feasible at its load / U (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the twin runs")
    p.add_argument("--workers", type=int, default=2, help="processes for verification (max 2)")
    p.set_defaults(func=cmd_plan)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[int, int], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=output.err_console,
        disable=not enabled or not output.err_console.is_terminal,
    ) as bar:
        task = bar.add_task("verifying replica groups in the twin", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def cmd_plan(args: argparse.Namespace) -> int:
    from placement.errors import PlacementError

    try:
        return _plan(args)
    except PlacementError as exc:
        raise CLIError(str(exc)) from None


def _plan(args: argparse.Namespace) -> int:
    from placement.choose import ChoiceRule, choose_plan
    from placement.compare import compare, policy_summary
    from placement.context import PlacementContext
    from placement.plan import Plan
    from placement.planner import make_plan
    from placement.policy import get_policy
    from placement.predictors import make_predictor
    from placement.verify import verify_plans
    from twin.profile import load_profile
    from twin.workload import Workload

    if not 1 <= args.workers <= 2:
        raise CLIError(f"--workers: 1 or 2 (this machine class has two cores), got {args.workers}")
    get_policy(args.policy)  # an unknown name is an error listing the known ones, before any work
    workload = Workload.from_yaml(args.workload)
    profile = load_profile(args.profile)
    predictor = make_predictor(args.predictor, profile, profile_ref=args.profile,
                               twin_window_s=args.twin_window, seed=args.seed)
    ctx = PlacementContext.for_profile(profile, predictor, gpu_budget=args.gpu_budget,
                                       target_utilisation=args.target_utilisation)
    verify_kw = {"duration_s": args.verify_duration, "seed": args.seed, "workers": args.workers}

    if args.compare:
        with _progress(not args.json) as progress:
            result = compare(workload, ctx, progress=progress, **verify_kw)
        if args.output:
            result.plans[args.policy].to_yaml(args.output)
        if args.json:
            print(json.dumps(_finite(result.to_dict())))
            return 0
        _print_comparison(workload, result, args)
        return 0

    t0 = time.perf_counter()
    if args.verify:
        rule = ChoiceRule(policy=args.policy, target_utilisations=(ctx.target_utilisation,))
        with _progress(not args.json) as progress:
            def twin(plans: Sequence[Plan]) -> list[Plan]:
                return verify_plans(plans, profile, progress=progress, **verify_kw)

            plan = choose_plan(workload, ctx, rule, twin)
    else:
        plan = make_plan(workload, ctx, args.policy)
    total_s = time.perf_counter() - t0
    if args.output:
        plan.to_yaml(args.output)
    if args.json:
        summary = policy_summary(plan)
        print_json({
            "policy": plan.policy,
            "predictor": plan.predictor,
            "workload": workload.name,
            "replicas": plan.replicas,
            "lower_bound_replicas": plan.lower_bound_replicas,
            "outside_domain_predictions": plan.settings.get("outside_domain_predictions", 0),
            "groups": len(plan.groups),
            "starved_replicas": summary["starved_replicas"],
            "metrics": plan.metrics_source(),
            "predicted_total_throughput_tps": plan.total("total_throughput_tps", "predicted"),
            "verified_total_throughput_tps": summary["verified_total_throughput_tps"],
            "offered_total_tps": summary["offered_total_tps"],
            "ttft_p99_ms": summary["ttft_p99_ms"],
            "plan_wall_s": plan.plan_wall_s,
            "total_wall_s": round(total_s, 4),
            "output": args.output,
        })
        return 0
    _print_plan(workload, plan, args, total_s)
    return 0


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(v: Any, spec: str = "{:,.0f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return spec.format(v)


def _print_plan(workload: Any, plan: Any, args: argparse.Namespace, total_s: float) -> None:
    console = output.console

    verified = plan.is_verified
    table = Table(
        title=f"{plan.policy} plan for {workload.name} ({plan.predictor} predictor"
        f"{', twin-verified' if verified else ''}); tok/s per replica",
        header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False,
    )
    table.caption = ("x: copies, n: adapters, slots: max_loras, R: max_lora_rank, room: "
                     "headroom (load multiplier before the replica is infeasible)")
    for col in ("group", "x", "n", "ranks", "slots", "R", "offered", "pred", "twin", "room",
                "starved"):
        table.add_column(col, justify="left" if col in ("group", "ranks") else "right",
                         no_wrap=True)
    for g in plan.groups[:MAX_TABLE_ROWS]:
        ranks = sorted({a.rank for a in g.adapters})
        starved = bool((g.verified if verified else g.predicted)["starved"])
        table.add_row(
            g.name, str(g.copies), str(len(g.adapters)),
            f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}",
            str(g.engine.max_loras), str(g.engine.max_lora_rank),
            _fmt(g.predicted["offered_total_tps"]), _fmt(g.predicted["total_throughput_tps"]),
            _fmt(g.verified["total_throughput_tps"]) if verified else "-",
            _fmt(g.headroom, "{:.2f}x"), "[red]yes[/]" if starved else "no",
        )
    console.print(table)
    if len(plan.groups) > MAX_TABLE_ROWS:
        console.print(f"... and {len(plan.groups) - MAX_TABLE_ROWS} more groups (see the YAML)")
    src = plan.metrics_source()
    console.print(
        f"[bold]{plan.replicas}[/] replicas (lower bound [bold]{plan.lower_bound_replicas}[/], "
        f"{plan.replicas / plan.lower_bound_replicas:.2f}x) | {plan.starved_replicas(src)} "
        f"starved ({src}) | {plan.total('total_throughput_tps', src):,.0f} of "
        f"{plan.total('offered_total_tps', src):,.0f} tok/s served ({src}) | worst TTFT p99 "
        f"{_fmt(plan.worst('ttft_p99_ms', src), '{:,.0f}')} ms | "
        f"{'planned and verified' if plan.is_verified else 'planned'} in "
        f"{total_s:.2f} s"
    )
    outside = plan.settings.get("outside_domain_predictions")
    if outside:
        console.print(f"[yellow]{outside} prediction(s) fell outside the surrogate's training "
                      f"domain ({plan.settings.get('outside_domain_features')}); the twin judged "
                      f"those ({plan.settings.get('outside_domain_twin_runs')} run(s))[/]")
    if args.output:
        console.print(f"wrote [bold]{args.output}[/]")
    if not verified:
        console.print("predicted figures only (--no-verify); without it every group is checked "
                      "with a full twin run")


def _print_comparison(workload: Any, result: Any, args: argparse.Namespace) -> None:
    console = output.console

    table = Table(title=f"policies on {workload.name} (twin-verified, "
                  f"{args.verify_duration:,.0f} s per replica)", header_style="bold",
                  box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    table.caption = ("served/offered: tok/s over all replicas; TTFT p99 (ms): the worst "
                     "replica's; plan s: the policy's planning time")
    for col in ("policy", "replicas", "x LB", "starved", "served", "offered", "TTFT p99",
                "plan s"):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    lb = result.lower_bound.replicas
    for name, s in result.to_dict()["policies"].items():
        table.add_row(
            name, str(s["replicas"]), f"{s['replicas'] / lb:.2f}", str(s["starved_replicas"]),
            _fmt(s["verified_total_throughput_tps"]), _fmt(s["offered_total_tps"]),
            _fmt(s["ttft_p99_ms"]), _fmt(s["plan_wall_s"], "{:.2f}"),
        )
    console.print(table)
    est = f"; the capacity estimate packing starts from: {result.estimate.replicas}" if (
        result.estimate) else ""
    console.print(f"lower bound: [bold]{lb}[/] replicas (roofline: "
                  f"{result.lower_bound.busy_ms_per_s / 1000:.2f} replica-seconds per second at "
                  f"the least; computed with the estimate in {result.lower_bound_wall_s:.2f} "
                  f"s{est})")
    if args.output:
        console.print(f"wrote the {args.policy} plan to [bold]{args.output}[/]")
