"""`lorafleet` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_WORKLOAD = REPO_ROOT / "examples" / "workload_reference_hour.yaml"
DEMO_PROFILE = "llama-3.1-8b-instruct"

console = Console()
err_console = Console(stderr=True)


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(v: Any) -> Any:
    """JSON has no NaN: report missing figures as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def print_json(obj: dict[str, Any]) -> None:
    print(json.dumps({k: _clean(v) for k, v in obj.items()}, default=_json_default))


# ----------------------------------------------------------------------------- simulate
SUMMARY_ROWS: list[tuple[str, str, str]] = [
    ("completed", "completed requests", "{:,}"),
    ("offered_requests", "offered requests", "{:,}"),
    ("total_throughput_tps", "total throughput (tok/s)", "{:,.1f}"),
    ("input_throughput_tps", "input throughput (tok/s)", "{:,.1f}"),
    ("output_throughput_tps", "output throughput (tok/s)", "{:,.1f}"),
    ("offered_total_tps", "offered load (tok/s)", "{:,.1f}"),
    ("request_throughput_rps", "request throughput (req/s)", "{:,.3f}"),
    ("ttft_mean_ms", "TTFT mean (ms)", "{:,.1f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:,.1f}"),
    ("tpot_mean_ms", "TPOT mean (ms)", "{:,.2f}"),
    ("itl_mean_ms", "ITL mean (ms)", "{:,.2f}"),
    ("itl_p99_ms", "ITL p99 (ms)", "{:,.2f}"),
    ("starved", "starved", "{}"),
    ("preemptions", "preemptions", "{:,}"),
    ("gpu_adapter_loads", "adapter loads CPU->GPU", "{:,}"),
    ("kv_cache_tokens", "KV cache (tokens)", "{:,}"),
    ("engine_steps", "engine steps", "{:,}"),
    ("simulated_s", "simulated (s)", "{:,.1f}"),
    ("wall_s", "wall (s)", "{:.3f}"),
    ("speedup_vs_realtime", "speed-up vs real time", "{:,.0f}x"),
]


def _fmt(fmt: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def summary_table(title: str, metrics: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, fmt in SUMMARY_ROWS:
        if key in metrics:
            table.add_row(label, _fmt(fmt, metrics[key]))
    return table


def cmd_simulate(args: argparse.Namespace) -> int:
    from twin.simulate import build_engine_config, simulate
    from twin.workload import Workload

    workload = Workload.from_yaml(args.workload)
    profile = _load_profile(args.profile)
    config = build_engine_config(
        workload,
        profile,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    result = simulate(workload, config, profile, seed=args.seed, duration_s=args.duration)
    summary = result.summary()
    if args.json:
        print_json(summary)
        return 0
    console.print(
        f"[bold]{workload.name}[/]: {len(workload.adapters)} adapters, "
        f"{workload.total_rate_rps:.2f} req/s offered | profile [bold]{profile.name}[/] "
        f"({profile.gpu}, vLLM {profile.vllm_version}) | max_loras={config.max_loras} "
        f"max_cpu_loras={config.cpu_slots} max_lora_rank={config.max_lora_rank} "
        f"max_num_seqs={config.max_num_seqs} | seed {args.seed}"
    )
    console.print(summary_table("twin prediction", summary))
    starved = [r for r in result.per_adapter if r["starved"]]
    if starved:
        console.print(
            f"[yellow]{len(starved)} of {len(result.per_adapter)} adapters got < 90% of their "
            "offered tokens[/]"
        )
    return 0


def _load_profile(name: str):
    from twin.profile import load_profile

    return load_profile(name)


# ----------------------------------------------------------------------------- calibrate
def cmd_calibrate(args: argparse.Namespace) -> int:
    from twin.calibrate import calibrate_reference

    profile, report = calibrate_reference(
        Path(args.data_dir), args.model, name=args.name, gpu=args.gpu, seed=args.seed
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.to_yaml(out)
    if args.json:
        print_json({"profile": str(out), **report})
        return 0
    table = Table(title=f"step-time fit: {profile.model} (held-out runs)", header_style="bold")
    for col in ("sweep", "steps", "MAPE %", "SMAPE %", "median |err| %"):
        table.add_column(col, justify="right" if col != "sweep" else "left")
    for row in report["held_out_by_sweep"]:
        table.add_row(
            row["sweep"], f"{row['steps']:,}", f"{row['mape_pct']:.2f}",
            f"{row['smape_pct']:.2f}", f"{row['median_ape_pct']:.2f}",
        )
    console.print(table)
    ho = report["held_out"]
    console.print(
        f"held-out steps: {ho['steps']:,}  MAPE {ho['mape_pct']:.2f} %  SMAPE "
        f"{ho['smape_pct']:.2f} %  (train {report['train']['steps']:,} steps, "
        f"SMAPE {report['train']['smape_pct']:.2f} %)"
    )
    console.print(f"wrote [bold]{out}[/]")
    return 0


# ----------------------------------------------------------------------------- profiles
def cmd_profiles(args: argparse.Namespace) -> int:
    from twin.profile import available_profiles, load_profile

    table = Table(title="profiles", header_style="bold")
    for col in ("name", "gpu", "model", "vLLM", "max_model_len", "held-out step SMAPE %"):
        table.add_column(col)
    for name in available_profiles():
        p = load_profile(name)
        smape = p.fit_report.get("held_out", {}).get("smape_pct")
        table.add_row(
            name, p.gpu, p.model, p.vllm_version, f"{p.max_model_len:,}",
            "-" if smape is None else f"{smape:.2f}",
        )
    console.print(table)
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """Until the serving path lands: the twin on the bundled reference-hour workload."""
    ns = argparse.Namespace(
        workload=str(DEMO_WORKLOAD), profile=DEMO_PROFILE, max_loras=32, max_cpu_loras=None,
        max_lora_rank=None, max_num_seqs=None, max_num_batched_tokens=None, duration=None,
        seed=0, json=args.json,
    )
    return cmd_simulate(ns)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafleet",
        description="Plan, simulate and serve many LoRA adapters on vLLM with a Digital Twin.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="run the Digital Twin of one vLLM replica on a workload")
    s.add_argument("workload", help="workload YAML (see docs/workload_format.md)")
    s.add_argument(
        "--profile", required=True, help="profile name (see `lorafleet profiles`) or YAML path"
    )
    s.add_argument("--max-loras", type=int, required=True, help="GPU adapter slots (max_loras)")
    s.add_argument("--max-cpu-loras", type=int, default=None,
                   help="CPU adapter cache size (default: the number of adapters in the workload)")
    s.add_argument("--max-lora-rank", type=int, default=None,
                   help="slot rank (default: smallest valid rank >= the workload's largest)")
    s.add_argument("--max-num-seqs", type=int, default=None,
                   help="max running requests (default: the profile's default_engine value)")
    s.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="chunked-prefill token budget (default: the profile's)")
    s.add_argument(
        "--duration", type=float, default=None, help="simulated seconds (default: the workload's)"
    )
    s.add_argument("--seed", type=int, default=0, help="request-generation seed")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("calibrate", help="fit a profile from per-step measurements")
    c.add_argument("data_dir", help="folder with step_profiles.csv.gz, profile_runs.csv, "
                   "kv_capacity.csv, adapter_loads.csv (reference-data format)")
    c.add_argument("--model", required=True, help="value of the tables' `model` column to fit")
    c.add_argument("-o", "--output", required=True, help="profile YAML to write")
    c.add_argument("--name", default=None, help="profile name (default: the model)")
    c.add_argument("--gpu", default=None, help="GPU label (default: from the data's README)")
    c.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    c.add_argument("--json", action="store_true", help="print the fit report as JSON")
    c.set_defaults(func=cmd_calibrate)

    pr = sub.add_parser("profiles", help="list the available profiles")
    pr.set_defaults(func=cmd_profiles)

    d = sub.add_parser("demo", help="the main job on the bundled example workload")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from twin.config import ConfigError
    from twin.profile import InfeasibleConfigError, ProfileError

    args = build_parser().parse_args(argv)
    user_errors: tuple[type[BaseException], ...] = (
        CLIError, ConfigError, ProfileError, InfeasibleConfigError, FileNotFoundError,
    )
    try:
        from twin.workload import WorkloadError

        user_errors = (*user_errors, WorkloadError)
        return int(args.func(args) or 0)
    except user_errors as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
