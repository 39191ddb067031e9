"""`lorafleet surrogate train|eval`: parse, call twin.surrogate, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from orchestrator.cli import output

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = REPO_ROOT / "data/reference/vllm-0.8.5-h100/validation_runs.csv"


def add_parser(subparsers: Any) -> None:
    """Register `surrogate train --profile NAME ...` and `surrogate eval --profile NAME ...`."""
    p = subparsers.add_parser(
        "surrogate",
        help="LightGBM surrogate of one replica (microsecond predictions for placement)",
        description="Train the surrogate on many twin runs over a designed space, or report "
        "its accuracy on held-out twin runs and on measured runs, and its speed.",
    )
    sub = p.add_subparsers(dest="surrogate_command", required=True, metavar="ACTION")

    t = sub.add_parser("train", help="run the twin over the designed space and fit the models")
    t.add_argument("--profile", required=True, help="profile name or YAML path")
    t.add_argument("--samples", type=int, default=2000, help="twin runs (default 2000)")
    t.add_argument("--capped-samples", type=int, default=4000,
                   help="twin runs of the capped design: overloaded replicas behind a client "
                   "with an in-flight cap (default 4000; those --data lacks are run and added)")
    t.add_argument("--capped-light-samples", type=int, default=1000,
                   help="twin runs of the light capped design: the same client, replicas offered "
                   "0.1-0.8x their capacity (default 1000; those --data lacks are run and added)")
    t.add_argument("--wide-samples", type=int, default=2000,
                   help="twin runs of the wide design: drawn lengths (prompts 4-4,000, outputs "
                   "2-2,000 tokens), 1-5,000 adapters, placement's max_loras grid; with the "
                   "first design they set the planning trees' domain (default 2000; those "
                   "--data lacks are run and added)")
    t.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    t.add_argument("--seed", type=int, default=0, help="seed of the design and the split")
    t.add_argument("--out", default=None,
                   help="output directory (default: profiles/NAME.surrogate next to the profile)")
    t.add_argument("--data", default=None,
                   help="reuse the twin runs of an earlier training (its samples.csv.gz)")
    t.add_argument("--window", type=float, default=3600.0,
                   help="simulated seconds per twin run (default 3600, as validation)")
    t.add_argument("--json", action="store_true", help="print the written meta as JSON")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy on held-out twin runs and real runs, and speed")
    e.add_argument("--profile", required=True, help="profile name or YAML path")
    e.add_argument("--runs", default=str(DEFAULT_RUNS),
                   help="measured runs table (default: the repo's H100 validation_runs.csv); "
                   "`none` to skip")
    e.add_argument("--dir", default=None, help="surrogate directory (default: next to profile)")
    e.add_argument("--seed", type=int, default=0, help="seed of the real runs' rate assignment")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)


def _fail(exc: Exception) -> int:
    output.err_console.print(f"[bold red]error:[/] {exc}")
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    from twin.surrogate import SurrogateError, train_surrogate

    if (args.workers < 1 or args.samples < 10 or args.capped_samples < 0
            or args.capped_light_samples < 0 or args.wide_samples < 0):
        return _fail(ValueError("--workers must be >= 1, --samples >= 10, --capped-samples, "
                                "--capped-light-samples and --wide-samples >= 0"))
    try:
        meta = train_surrogate(
            args.profile, samples=args.samples, capped_samples=args.capped_samples,
            capped_light_samples=args.capped_light_samples, wide_samples=args.wide_samples,
            workers=args.workers, seed=args.seed,
            out=args.out, data=args.data, duration_s=args.window, progress=not args.json,
        )
    except SurrogateError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(meta))
        return 0
    console = output.console
    console.print(f"wrote [bold]{meta['directory']}[/] ({meta['n_samples']} twin runs, "
                  f"{meta.get('n_capped', 0)} of them capped "
                  f"({meta.get('n_capped_light', 0)} below capacity), "
                  f"{meta.get('n_wide', 0)} of the wide design, {meta['n_held_out']} + "
                  f"{meta.get('n_held_out_capped', 0)} held out; "
                  f"throughput as {meta['throughput_target']}, starvation by "
                  f"{meta['starvation']})")
    _print_held_out(console, meta)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:

    from twin.surrogate import SurrogateError, evaluate_surrogate

    runs = None if str(args.runs).lower() == "none" else args.runs
    try:
        report = evaluate_surrogate(args.profile, runs, directory=args.dir, seed=args.seed)
    except SurrogateError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(report))
        return 0
    console = output.console
    _print_held_out(console, report)
    if "real_runs" in report:
        console.print(_real_runs_table(report["real_runs"]))
    console.print(
        f"speed: one predict {report['predict_us_single']:.1f} µs; a batch of 1,000 "
        f"{report['predict_ms_batch_1000']:.2f} ms (predict_arrays), "
        f"{report['predict_ms_batch_1000_with_features']:.2f} ms with features; "
        f"{report['n_trees']} trees"
    )
    return 0


def _print_held_out(console: Any, report: dict[str, Any]) -> None:
    """One held-out table per design the report scores."""
    for key, design in (("held_out", "uncapped client"),
                        ("held_out_capped_design", "capped design"),
                        ("held_out_capped_light", "light capped design"),
                        ("held_out_wide", "wide design")):
        if report.get(key):
            console.print(_held_out_table(report[key], design))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} %"


def _held_out_table(held: dict[str, Any], design: str = "uncapped client") -> Any:
    from rich.table import Table

    table = Table(title=f"held-out twin runs, {design} (standard SMAPE)", header_style="bold")
    for col in ("metric", "all runs", "n", "not starved", "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, s in held.items():
        if isinstance(s, dict):
            table.add_row(metric, _pct(s["smape"]), str(s["n"]), _pct(s["smape_not_starved"]),
                          str(s["n_not_starved"]))
    table.add_row("starvation macro-F1", f"{held['starvation_macro_f1']:.4f}", "", "", "")
    return table


def _real_runs_table(real: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"measured runs ({real['n_runs']}; read behind their client's cap by "
                  f"{real.get('throughput_behind_cap', '-')})", header_style="bold")
    for col in ("metric", "SMAPE / score", "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, s in real.items():
        if isinstance(s, dict):
            table.add_row(metric, _pct(s["smape"]), str(s["n"]))
    for key in ("starvation_macro_f1", "starvation_macro_f1_uncapped_client",
                "starvation_accuracy"):
        if real.get(key) is not None:
            table.add_row(key.replace("_", " "), f"{real[key]:.4f}", str(real["n_runs"]))
    return table
