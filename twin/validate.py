"""Replay measured one-hour runs in the twin and score it, metric by metric.

Input is a runs table in the format of ``validation_runs.csv`` (the reference data, or rows that
``lorafleet bench`` appends for a live engine). For every usable row the run's workload and
engine are rebuilt from its configuration columns only — served adapters and rank mix,
per-adapter Poisson rates, ShareGPT-like lengths with the run's prompt-pool means, the window —
and simulated with a seed; nothing is fitted to the measured results.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twin.calibrate import smape
from twin.config import EngineConfig
from twin.lengths import SHAREGPT_OUTPUT_MEAN, LengthModel
from twin.metrics import STARVATION_THRESHOLD
from twin.parallel import Progress, process_map
from twin.profile import load_profile
from twin.simulate import simulate
from twin.workload import AdapterSpec, Workload

METRICS = (
    "total_throughput_tps", "output_throughput_tps", "ttft_mean_ms", "tpot_mean_ms",
    "itl_mean_ms",
)
AUTHORS_COLUMNS = {
    "total_throughput_tps": "authors_twin_total_throughput",
    "output_throughput_tps": "authors_twin_output_throughput",
    "ttft_mean_ms": "authors_twin_ttft",
    "itl_mean_ms": "authors_twin_itl",
}
REQUIRED_COLUMNS = (
    "model", "workload", "run", "status", "max_loras", "max_cpu_loras", "max_lora_rank",
    "max_num_seqs", "rank_mix", "adapter_rate_counts", "window_s",
)
NOT_STARVED_ONLY = {"ttft_mean_ms"}  # the earlier twin charges unfinished requests the window

# The reference runs' load generator (vLLM 0.8.5 benchmark_serving) opens one TCP connection per
# request to a server on the same node, so it can hold at most one request per ephemeral port in
# flight: Linux's default range 32768-60999 is 28,232 ports. Beyond that a request fails to
# connect and is never served. The runs' Prometheus series agree: waiting + running never
# exceeds ~28.5 k although up to 1.3 M requests were offered.
REFERENCE_CLIENT_MAX_INFLIGHT = 60999 - 32768 + 1

# The reference runs did not set ``ignore_eos``: a model may end its answer before the ShareGPT
# reference length it was given as max_tokens. The data's README (caveat 6) reports completed
# requests' outputs at 96.5 % (median over the lightly loaded runs, >= 97 % completed) of the
# reference length, inputs exact. Rows written by `lorafleet bench` set ignore_eos (factor 1).
REFERENCE_EOS_OUTPUT_SCALE = 0.965


class ValidationError(ValueError):
    """A runs table that cannot be replayed (the message names the column or row)."""


def load_runs(path: str | Path) -> pd.DataFrame:
    """Read a runs table and keep the replayable rows: status ok and no quality flag."""
    path = Path(path)
    if not path.exists():
        raise ValidationError(f"runs table not found: {path}")
    df = pd.read_csv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValidationError(f"{path}: missing column(s) {missing}")
    ok = df["status"] == "ok"
    if "quality_flag" in df.columns:
        ok &= df["quality_flag"].isna() | (df["quality_flag"].astype(str).str.strip() == "")
    return df[ok].reset_index(drop=True)


def _json_counts(row: pd.Series, column: str) -> dict[float, int]:
    try:
        raw = json.loads(row[column])
        return {float(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError, AttributeError):
        raise ValidationError(
            f"run {row.get('run')!r}: column {column} must be a JSON object {{value: count}}, "
            f"got {row.get(column)!r}"
        ) from None


def _present(row: pd.Series, column: str) -> bool:
    value = row.get(column)
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and (
        str(value).strip() != ""
    )


def run_client_cap(row: pd.Series, default: int | None) -> int | None:
    """A row's load-generator cap: its own column when recorded (empty = unbounded)."""
    if "client_max_inflight" in row.index:
        return int(row["client_max_inflight"]) if _present(row, "client_max_inflight") else None
    return default


def run_seed(row: pd.Series, default: int) -> int:
    """Rows written by `lorafleet bench` carry the seed their requests were generated with."""
    return int(row["seed"]) if _present(row, "seed") else default


def run_workload(
    row: pd.Series, seed: int = 0, output_scale: float = 1.0
) -> tuple[Workload, EngineConfig]:
    """The workload and engine config of one measured run, from its configuration columns.

    A row written by `lorafleet bench` carries its exact workload (``workload_json``). For the
    reference runs, which adapter got which rate and rank is random and not logged; here it is
    drawn with ``seed`` (rates and ranks shuffled independently, as the benchmark did), and
    ``output_scale`` scales the ShareGPT output mean (early EOS, REFERENCE_EOS_OUTPUT_SCALE); a
    bench row ignores it (bench sets ignore_eos: answers run to max_tokens).
    """
    config = _run_config(row)
    if _present(row, "workload_json"):
        try:
            workload = Workload.from_dict(json.loads(row["workload_json"]))
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"run {row['run']!r}: workload_json: {exc}") from None
        return replace(workload, duration_s=float(row["window_s"])), config
    ranks = _json_counts(row, "rank_mix")
    rates = _json_counts(row, "adapter_rate_counts")
    n_ranks = sum(ranks.values())
    n_rates = sum(rates.values())
    if n_ranks != n_rates:
        raise ValidationError(
            f"run {row['run']!r}: rank_mix has {n_ranks} adapters, adapter_rate_counts {n_rates}"
        )
    rng = np.random.default_rng(seed)
    rank_list = rng.permutation(np.repeat([int(r) for r in ranks], list(ranks.values())))
    rate_list = rng.permutation(np.repeat(list(rates), list(rates.values())))
    adapters = tuple(
        AdapterSpec(id=f"dummy-{i}", rank=int(r), rate_rps=float(q))
        for i, (r, q) in enumerate(zip(rank_list, rate_list, strict=True))
    )
    lengths: dict[str, Any] = {"kind": "sharegpt"}
    pool = row.get("pool_prompts")
    if pool == pool and pool:  # the run's own prompt pool means, when recorded
        lengths["prompt_mean"] = float(row["pool_input_tokens"]) / float(pool)
        lengths["output_mean"] = float(row["pool_output_tokens"]) / float(pool)
    if output_scale != 1.0:
        lengths["output_mean"] = lengths.get("output_mean", SHAREGPT_OUTPUT_MEAN) * output_scale
    workload = Workload(
        name=f"{row['workload']}/{row['run']}",
        adapters=adapters,
        lengths=LengthModel.from_dict(lengths),
        duration_s=float(row["window_s"]),
    )
    return workload, config


def _run_config(row: pd.Series) -> EngineConfig:
    budget = (
        int(row["max_num_batched_tokens"])
        if _present(row, "max_num_batched_tokens")
        else max(2048, int(row["max_num_seqs"]))  # the reference runs: vLLM's 2048 default
    )
    return EngineConfig(
        max_loras=int(row["max_loras"]),
        max_cpu_loras=int(row["max_cpu_loras"]),
        max_lora_rank=int(row["max_lora_rank"]),
        max_num_seqs=int(row["max_num_seqs"]),
        max_num_batched_tokens=budget,
        block_size=int(row["block_size"]) if _present(row, "block_size") else 16,
        max_model_len=int(row["max_model_len"]) if _present(row, "max_model_len") else None,
    )


def measured_starved(row: pd.Series) -> bool:
    """The run is starved when it completed < 90 % of its offered tokens."""
    offered = row.get("offered_total_tps_est")
    if offered != offered or offered is None:
        raise ValidationError(f"run {row['run']!r}: no offered_total_tps_est to judge starvation")
    return bool(row["total_throughput_tps"] < STARVATION_THRESHOLD * offered)


def through_serving_path(row: pd.Series) -> bool:
    """Whether a run was measured by a client of a server (the reference benchmark, lorafleet's
    serving path) - the twin adds the profile's serving path - or in-process (``lorafleet
    bench``'s engine: the twin times the engine alone)."""
    engine = row.get("engine")
    return not isinstance(engine, str) or not engine or engine.startswith("lorafleet-serve")


def _predict_one(args: tuple[dict[str, Any], str, int, int | None, float]) -> dict[str, Any]:
    row_dict, profile_ref, default_seed, default_cap, output_scale = args
    row = pd.Series(row_dict)
    profile = load_profile(profile_ref)
    seed = run_seed(row, default_seed)
    workload, config = run_workload(row, seed, output_scale)
    cap = run_client_cap(row, default_cap)
    res = simulate(workload, config, profile, seed=seed, client_max_inflight=cap,
                   serving=through_serving_path(row))
    m = res.metrics
    return {
        "model": row["model"],
        "workload": row["workload"],
        "run": row["run"],
        "profile": profile.name,
        **{f"twin_{k}": m[k] for k in METRICS},
        "twin_starved": m["starved"],
        "twin_completed": m["completed"],
        "twin_preemptions": m["preemptions"],
        "twin_client_dropped": m["client_dropped"],
        "twin_client_max_inflight": cap,
        "twin_wall_s": m["wall_s"],
        "twin_engine_steps": m["engine_steps"],
    }


@dataclass
class ValidationResult:
    predictions: pd.DataFrame  # one row per run: measured, ours, the earlier twin's
    summary: dict[str, Any]


def resolve_profile(row: pd.Series, profile: str) -> str:
    """``auto`` picks the profile named like the row's model; a missing one is an error."""
    name = str(row["model"]) if profile == "auto" else profile
    load_profile(name)  # raises ProfileError naming what is available
    return name


def validate(
    runs: pd.DataFrame,
    profile: str = "auto",
    *,
    limit: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: Progress | None = None,
    client_max_inflight: int | str | None = "auto",
    eos_output_scale: float | str = "auto",
) -> ValidationResult:
    """Simulate every run (or a seeded sample of ``limit``) and score the twin per metric.

    ``client_max_inflight``: the load generator's in-flight cap for rows that do not record
    one: ``"auto"`` = the reference harness's (REFERENCE_CLIENT_MAX_INFLIGHT), an int, or None
    (unbounded). ``eos_output_scale``: output lengths of the reference rows (no
    ``workload_json``) relative to the ShareGPT reference: ``"auto"`` =
    REFERENCE_EOS_OUTPUT_SCALE, or a number in (0, 1] (1: every answer runs to max_tokens).
    """
    wall0 = time.perf_counter()
    if limit is not None and limit < len(runs):
        runs = runs.sample(n=limit, random_state=seed).sort_index()
    runs = runs.reset_index(drop=True)
    if client_max_inflight == "auto":
        default_cap: int | None = REFERENCE_CLIENT_MAX_INFLIGHT
    elif client_max_inflight is None or isinstance(client_max_inflight, int):
        default_cap = client_max_inflight
    else:
        raise ValidationError(
            f"client_max_inflight: 'auto', an integer or None, got {client_max_inflight!r}"
        )
    if eos_output_scale == "auto":
        scale = REFERENCE_EOS_OUTPUT_SCALE
    elif (isinstance(eos_output_scale, int | float) and not isinstance(eos_output_scale, bool)
          and 0.0 < eos_output_scale <= 1.0):
        scale = float(eos_output_scale)
    else:
        raise ValidationError(f"eos_output_scale: 'auto' or a number in (0, 1], "
                              f"got {eos_output_scale!r}")
    jobs = [
        (r.to_dict(), resolve_profile(r, profile), seed, default_cap, scale)
        for _, r in runs.iterrows()
    ]
    # heavy runs first so the pool stays busy to the end
    order = np.argsort(-runs["offered_request_rate_rps"].fillna(0).to_numpy(), kind="stable")
    ran = process_map(workers or max(1, os.cpu_count() or 1))(
        _predict_one, [jobs[i] for i in order], progress
    )
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    for i, res in zip(order, ran, strict=True):
        results[i] = res
    pred = pd.DataFrame(results)
    pred = pred.drop(columns=["model", "workload", "run"])
    table = pd.concat([runs.reset_index(drop=True), pred], axis=1)
    table["measured_starved"] = [measured_starved(r) for _, r in table.iterrows()]
    summary = summarize(table)
    summary["wall_s"] = round(time.perf_counter() - wall0, 3)
    return ValidationResult(predictions=table, summary=summary)


def summarize(table: pd.DataFrame) -> dict[str, Any]:
    """SMAPE per metric (ours and the earlier twin's on the same rows) and starvation accuracy."""
    not_starved = ~table["measured_starved"].to_numpy(bool)
    out: dict[str, Any] = {"n_runs": int(len(table)), "metrics": {}}
    for metric in METRICS:
        mask = np.isfinite(table[metric].to_numpy(float)) & np.isfinite(
            table[f"twin_{metric}"].to_numpy(float)
        )
        if metric in NOT_STARVED_ONLY:
            mask &= not_starved
        y = table.loc[mask, metric].to_numpy(float)
        ours = smape(y, table.loc[mask, f"twin_{metric}"].to_numpy(float)) if mask.any() else None
        authors = None
        col = AUTHORS_COLUMNS.get(metric)
        if col and col in table.columns:
            am = mask & np.isfinite(table[col].to_numpy(float))
            if am.any():
                authors = smape(table.loc[am, metric].to_numpy(float),
                                table.loc[am, col].to_numpy(float))
        out["metrics"][metric] = {
            "smape": _round(ours), "n": int(mask.sum()), "authors_twin_smape": _round(authors),
        }
    pred_starved = table["twin_starved"].to_numpy(bool)
    real = table["measured_starved"].to_numpy(bool)
    out["starvation_accuracy"] = _round(float(np.mean(pred_starved == real)) if len(real) else None)
    if "authors_twin_total_throughput" in table.columns and "offered_total_tps_est" in table:
        a = table["authors_twin_total_throughput"].to_numpy(float)
        ok = np.isfinite(a)
        if ok.any():
            a_starved = a[ok] < STARVATION_THRESHOLD * table["offered_total_tps_est"].to_numpy(
                float
            )[ok]
            out["authors_twin_starvation_accuracy"] = _round(float(np.mean(a_starved == real[ok])))
    out["by_model"] = {}
    for model, grp in table.groupby("model"):
        sub = {}
        for metric in METRICS:
            mask = np.isfinite(grp[metric].to_numpy(float))
            if metric in NOT_STARVED_ONLY:
                mask &= ~grp["measured_starved"].to_numpy(bool)
            sub[metric] = _round(
                smape(grp.loc[mask, metric].to_numpy(float),
                      grp.loc[mask, f"twin_{metric}"].to_numpy(float))
            ) if mask.any() else None
        sub["starvation_accuracy"] = _round(
            float(np.mean(grp["twin_starved"].to_numpy(bool) == grp["measured_starved"]))
        )
        out["by_model"][str(model)] = sub
    out["twin_wall_s_total"] = _round(float(table["twin_wall_s"].sum()))
    return out


def _round(x: float | None, nd: int = 3) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), nd)


def scatter_plots(table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Predicted vs measured, one PNG per metric (ours and the earlier twin's where present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(5.2, 5))
        mask = np.isfinite(table[metric].to_numpy(float))
        if metric in NOT_STARVED_ONLY:
            mask &= ~table["measured_starved"].to_numpy(bool)
        y = table.loc[mask, metric].to_numpy(float)
        for model, marker in zip(sorted(table["model"].unique()), "os^", strict=False):
            mm = mask & (table["model"] == model).to_numpy()
            ax.scatter(table.loc[mm, metric], table.loc[mm, f"twin_{metric}"], s=14,
                       marker=marker, alpha=0.75, label=f"lorafleet · {model}")
        col = AUTHORS_COLUMNS.get(metric)
        if col in table.columns:
            am = mask & np.isfinite(table[col].to_numpy(float))
            ax.scatter(table.loc[am, metric], table.loc[am, col], s=10, marker="x", alpha=0.5,
                       color="grey", label="earlier twin (Agulló et al.)")
        if len(y):
            lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            if hi / max(lo, 1e-9) > 50:
                ax.set_xscale("log")
                ax.set_yscale("log")
        ax.set_xlabel(f"measured {metric}")
        ax.set_ylabel(f"predicted {metric}")
        ax.set_title(metric + (" (non-starved runs)" if metric in NOT_STARVED_ONLY else ""))
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"validate_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
