"""`lorafleet simulate | calibrate | validate | profiles | demo --twin-only`: the twin's
commands (docs/twin.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from orchestrator.cli import output
from orchestrator.cli.output import CLIError, print_json
from twin.profile import Profile

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    output.console.print(
        f"[bold]{workload.name}[/]: {len(workload.adapters)} adapters, "
        f"{workload.total_rate_rps:.2f} req/s offered | profile [bold]{profile.name}[/] "
        f"({profile.gpu}, vLLM {profile.vllm_version}) | max_loras={config.max_loras} "
        f"max_cpu_loras={config.cpu_slots} max_lora_rank={config.max_lora_rank} "
        f"max_num_seqs={config.max_num_seqs} | seed {args.seed}"
    )
    output.console.print(summary_table("twin prediction", summary))
    starved = [r for r in result.per_adapter if r["starved"]]
    if starved:
        output.console.print(
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
    kept = None
    if out.exists():  # a serving path measured for this profile stays (it is not in the data)
        with contextlib.suppress(ValueError):
            kept = Profile.from_yaml(out).serving_path
        profile = profile.with_serving_path(kept)
    profile.to_yaml(out)
    if kept is not None:
        source = kept.source or "measured earlier"
        output.err_console.print(f"kept {out}'s serving-path term ({source}); `lorafleet "
                                 "profile --serving-path` re-measures it", highlight=False)
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
    output.console.print(table)
    ho = report["held_out"]
    output.console.print(
        f"held-out steps: {ho['steps']:,}  MAPE {ho['mape_pct']:.2f} %  SMAPE "
        f"{ho['smape_pct']:.2f} %  (train {report['train']['steps']:,} steps, "
        f"SMAPE {report['train']['smape_pct']:.2f} %); a constant step time would score "
        f"SMAPE {report['held_out_constant']['smape_pct']:.2f} %"
    )
    output.console.print(f"wrote [bold]{out}[/]")
    return 0


# ----------------------------------------------------------------------------- validate
VALIDATE_LABELS = {
    "total_throughput_tps": "total throughput",
    "output_throughput_tps": "output throughput",
    "ttft_mean_ms": "TTFT mean (non-starved runs)",
    "tpot_mean_ms": "TPOT mean",
    "itl_mean_ms": "ITL mean",
}


def _client_cap(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return int(text)
    except ValueError:
        raise CLIError(f"--client-max-inflight: auto, none or an integer, got {text!r}") from None


def _eos_scale(text: str) -> float | str:
    """Parse only: ``validate`` checks the range (its ValidationError names the field)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise CLIError(f"--eos-output-scale: auto or a number in (0, 1], got {text!r}") from None


def cmd_validate(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from twin.validate import load_runs, scatter_plots, validate

    runs = load_runs(args.runs)
    if runs.empty:
        raise CLIError(f"{args.runs}: no row with status ok and an empty quality_flag")
    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=output.err_console,
        disable=args.json or not output.err_console.is_terminal,
    ) as bar:
        task = bar.add_task("replaying runs in the twin", total=min(len(runs), args.limit or 10**9))
        result = validate(
            runs, args.profile, limit=args.limit, seed=args.seed, workers=args.workers,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            client_max_inflight=_client_cap(args.client_max_inflight),
            eos_output_scale=_eos_scale(args.eos_output_scale),
        )
    out = Path(args.out) if args.out else None
    plots: list[Path] = []
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.predictions.to_csv(out, index=False)
        plots = scatter_plots(result.predictions, out.parent)
    summary = dict(result.summary)
    if args.json:
        print(json.dumps({
            "n_runs": summary["n_runs"], "metrics": summary["metrics"],
            "starvation_accuracy": summary["starvation_accuracy"],
            "authors_twin_starvation_accuracy": summary.get("authors_twin_starvation_accuracy"),
            "by_model": summary["by_model"], "wall_s": summary["wall_s"],
        }))
        return 0
    table = Table(title=f"twin vs {summary['n_runs']} measured runs (standard SMAPE, %)",
                  header_style="bold")
    table.add_column("metric")
    table.add_column("runs", justify="right")
    table.add_column("lorafleet", justify="right")
    table.add_column("earlier twin", justify="right")
    models = sorted(summary["by_model"])
    for model in models:
        table.add_column(f"lorafleet · {model}", justify="right")
    for metric, label in VALIDATE_LABELS.items():
        m = summary["metrics"][metric]
        table.add_row(
            label, str(m["n"]), _fmt("{:.2f}", m["smape"]), _fmt("{:.2f}", m["authors_twin_smape"]),
            *[_fmt("{:.2f}", summary["by_model"][mm][metric]) for mm in models],
        )
    table.add_row(
        "starvation accuracy", str(summary["n_runs"]),
        _fmt("{:.3f}", summary["starvation_accuracy"]),
        _fmt("{:.3f}", summary.get("authors_twin_starvation_accuracy")),
        *[_fmt("{:.3f}", summary["by_model"][mm]["starvation_accuracy"]) for mm in models],
    )
    output.console.print(table)
    output.console.print(f"twin time: {summary['twin_wall_s_total']:.1f} s of simulation for "
                  f"{summary['n_runs']} simulated hours; wall {summary['wall_s']:.1f} s")
    if out:
        output.console.print(f"wrote {out} and {len(plots)} plots in {out.parent}")
    return 0


# ----------------------------------------------------------------------------- profiles
def cmd_profiles(args: argparse.Namespace) -> int:
    from twin.profile import available_profiles, load_profile

    table = Table(title="profiles", header_style="bold")
    for col in ("name", "gpu", "model", "vLLM", "max_model_len", "held-out step SMAPE %",
                "serving path"):
        table.add_column(col)
    for name in available_profiles():
        p = load_profile(name)
        smape = p.fit_report.get("held_out", {}).get("smape_pct")
        table.add_row(
            name, p.gpu, p.model, p.vllm_version, f"{p.max_model_len:,}",
            "-" if smape is None else f"{smape:.2f}",
            p.serving_path.describe() if p.serving_path else
            "[yellow]not measured: latencies are the engine's alone[/]",
        )
    output.console.print(table)
    return 0


# ----------------------------------------------------------------------------- demo
DEMO_RUNS = REPO_ROOT / "data" / "reference" / "vllm-0.8.5-h100" / "validation_runs.csv"
DEMO_RUN = ("llama-3.1-8b-instruct", "rank_16_rates_0.1_0.05_0.025", "_128_128_16_")
DEMO_ROWS = [
    ("total_throughput_tps", "authors_twin_total_throughput", "total throughput (tok/s)",
     "{:,.0f}"),
    ("output_throughput_tps", "authors_twin_output_throughput", "output throughput (tok/s)",
     "{:,.0f}"),
    ("ttft_mean_ms", "authors_twin_ttft", "TTFT mean (ms)", "{:,.1f}"),
    ("tpot_mean_ms", None, "TPOT mean (ms)", "{:,.2f}"),
    ("itl_mean_ms", "authors_twin_itl", "ITL mean (ms)", "{:,.2f}"),
    ("completed", "authors_twin_finished_requests", "completed requests", "{:,.0f}"),
]


def cmd_demo(args: argparse.Namespace) -> int:
    """Until the serving path lands: a measured H100 hour vs the twin's replay of it."""
    import pandas as pd

    from twin.simulate import simulate
    from twin.validate import load_runs, run_workload

    runs = load_runs(DEMO_RUNS)
    model, workload_name, run_name = DEMO_RUN
    row = runs[(runs["model"] == model) & (runs["workload"] == workload_name)
               & (runs["run"] == run_name)]
    if row.empty:
        raise CLIError(f"{DEMO_RUNS}: the demo run {DEMO_RUN} is missing")
    row = row.iloc[0]
    workload, config = run_workload(row, seed=0)
    profile = _load_profile(model)
    result = simulate(workload, config, profile, seed=0)
    m = result.metrics
    if args.json:
        print_json({"run": "/".join(DEMO_RUN), **m})
        return 0
    output.console.print(
        f"[bold]demo[/]: one hour of vLLM 0.8.5 on an H100 ({model}), {len(workload.adapters)} "
        f"LoRA adapters (ranks 8/16), {workload.total_rate_rps:.1f} req/s Poisson, "
        f"max_loras={config.max_loras} max_lora_rank={config.max_lora_rank} - measured "
        "(data/reference) vs replayed in the twin"
    )
    table = Table(title="measured vs predicted", header_style="bold")
    for col in ("metric", "measured (H100)", "lorafleet twin", "error", "earlier twin"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, authors, label, fmt in DEMO_ROWS:
        real, ours = float(row[key]), float(m[key])
        theirs = row.get(authors) if authors else None
        table.add_row(
            label, fmt.format(real), fmt.format(ours), f"{(ours - real) / real * 100:+.1f} %",
            "-" if theirs is None or pd.isna(theirs) else fmt.format(float(theirs)),
        )
    output.console.print(table)
    output.console.print(
        f"twin: {m['engine_steps']:,} engine steps, {m['simulated_s']:,.0f} simulated s in "
        f"{m['wall_s']:.2f} s wall ({m['speedup_vs_realtime']:,.0f}x real time). The earlier "
        "twin's TTFT charges unfinished requests the whole window."
    )
    return 0


