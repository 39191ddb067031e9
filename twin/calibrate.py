"""Fit a profile from measurements in the reference-data format.

Inputs (one folder, the layout of data/reference/vllm-0.8.5-h100 and of what `lorafleet profile`
records on a live engine): ``step_profiles.csv.gz`` (one row per engine step), ``profile_runs.csv``
(one row per profiling run: its configuration), ``kv_capacity.csv`` and ``adapter_loads.csv``.

The step logs do not say what was in each step, only how many tokens and adapters. The
profiling runs are deterministic, though (identical prompts, fixed output lengths, all requests
at t=0), so ``twin.step_features`` replays each run through the twin's own scheduler and labels
every measured step with its batch composition. The fit is non-negative least squares on those
features with whole runs held out, so the reported error is on runs the model never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import nnls

from twin.config import EngineConfig
from twin.latency import FEATURES, StepTimeModel, design_matrix, rank_tiles
from twin.profile import AdapterLoadTable, KVCapacityModel, Profile, SchedulerQuirks
from twin.serving_path import QUANTILE_LEVELS, ServingPath
from twin.simulate import simulate_requests
from twin.step_features import CalibrationError, reference_step_features
from twin.workload import RequestBatch

REQUIRED_FILES = (
    "step_profiles.csv.gz", "profile_runs.csv", "kv_capacity.csv", "adapter_loads.csv",
)


@dataclass(frozen=True)
class ReferenceData:
    steps: pd.DataFrame
    runs: pd.DataFrame
    kv: pd.DataFrame
    loads: pd.DataFrame
    readme: str
    meta: dict[str, Any]  # calibration.yaml: facts about the engine the data came from


META_FILE = "calibration.yaml"
META_KEYS = {
    "gpu", "model", "vllm_version", "cuda_graph_max_tokens", "scheduler", "max_model_len",
    "default_engine", "source",
}


def load_meta(data_dir: Path) -> dict[str, Any]:
    """Optional ``calibration.yaml`` next to the tables (written by `lorafleet profile`)."""
    path = Path(data_dir) / META_FILE
    if not path.exists():
        return {}
    meta = yaml.safe_load(path.read_text()) or {}
    if not isinstance(meta, dict):
        raise CalibrationError(f"{path}: must be a mapping")
    unknown = sorted(set(meta) - META_KEYS)
    if unknown:
        raise CalibrationError(f"{path}: unknown field(s) {unknown}; known: {sorted(META_KEYS)}")
    return meta


def load_reference(data_dir: Path, model: str) -> ReferenceData:
    """The four tables restricted to ``model``; errors name what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CalibrationError(f"calibration data folder not found: {data_dir}")
    missing = [f for f in REQUIRED_FILES if not (data_dir / f).exists()]
    if missing:
        raise CalibrationError(
            f"{data_dir}: missing {missing} (expected {list(REQUIRED_FILES)})"
        )
    tables = {
        "steps": pd.read_csv(data_dir / "step_profiles.csv.gz"),
        "runs": pd.read_csv(data_dir / "profile_runs.csv"),
        "kv": pd.read_csv(data_dir / "kv_capacity.csv"),
        "loads": pd.read_csv(data_dir / "adapter_loads.csv"),
    }
    out = {}
    for key, df in tables.items():
        if "model" not in df.columns:
            raise CalibrationError(f"{data_dir}: table {key} has no `model` column")
        sub = df[df["model"] == model]
        if sub.empty:
            models = sorted(df["model"].dropna().unique().tolist())
            raise CalibrationError(
                f"{data_dir}: no rows for model {model!r} in {key}; has {models}"
            )
        out[key] = sub.reset_index(drop=True)
    readme = (data_dir / "README.md").read_text() if (data_dir / "README.md").exists() else ""
    return ReferenceData(readme=readme, meta=load_meta(data_dir), **out)


# ----------------------------------------------------------------------------- KV capacity
def fit_kv_capacity(kv: pd.DataFrame, runs: pd.DataFrame) -> KVCapacityModel:
    """Least squares of tokens = base - G*(per_slot + per_slot_rank*R) on probes that started."""
    ok = kv[(kv["status"] == "ok") & kv["kv_cache_tokens"].notna()]
    if ok.empty:
        raise CalibrationError("kv_capacity.csv: no probe with status ok")
    g = ok["max_loras"].to_numpy(float)
    r = ok["max_lora_rank"].to_numpy(float)
    y = ok["kv_cache_tokens"].to_numpy(float)
    if len(ok) >= 3 and len(np.unique(g * r)) >= 2:
        x = np.column_stack([np.ones_like(g), -g, -g * r])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    else:
        # a fixed KV budget (e.g. the CPU backend's VLLM_CPU_KVCACHE_SPACE): no slope to fit
        coef = np.array([float(y.min()), 0.0, 0.0])
    no_lora = runs[(runs["enable_lora"] == 0) & runs["kv_cache_tokens"].notna()]
    if len(no_lora):
        # capacity shrinks a little with max_num_seqs; keep the largest-batch probe (conservative)
        row = no_lora.sort_values("max_num_seqs_effective").iloc[-1]
        no_lora_tokens = float(row["kv_cache_tokens"])
    else:
        no_lora_tokens = float(coef[0])
    points = tuple(
        (int(a), int(b), int(c))
        for a, b, c in ok[["max_loras", "max_lora_rank", "kv_cache_tokens"]].to_numpy()
    )
    return KVCapacityModel(
        base_tokens=round(float(coef[0]), 1),
        per_slot_tokens=round(float(coef[1]), 3),
        per_slot_rank_tokens=round(float(coef[2]), 3),
        no_lora_tokens=no_lora_tokens,
        points=points,
    )


# ----------------------------------------------------------------------------- adapter loads
def fit_adapter_loads(loads: pd.DataFrame) -> AdapterLoadTable:
    """Median load latencies: CPU->GPU while serving by (slot rank, adapter rank); disk by rank."""
    gpu = loads[(loads["kind"] == "memory_to_gpu") & (loads["phase"] == "serving")]
    if gpu.empty:
        gpu = loads[loads["kind"] == "memory_to_gpu"]
    disk = loads[loads["kind"] == "disk_to_cpu"]
    if gpu.empty:
        raise CalibrationError("adapter_loads.csv: no memory_to_gpu events")
    gpu_tab = gpu.groupby(["max_lora_rank", "adapter_rank"])["load_ms"].median()
    disk_tab = disk.groupby("adapter_rank")["load_ms"].median() if len(disk) else pd.Series()
    return AdapterLoadTable(
        gpu_ms={(int(r), int(a)): round(float(v), 3) for (r, a), v in gpu_tab.items()},
        disk_ms={int(a): round(float(v), 3) for a, v in disk_tab.items()},
        default_gpu_ms=round(float(gpu["load_ms"].median()), 3),
        default_disk_ms=round(float(disk["load_ms"].median()), 3) if len(disk) else 0.0,
    )


# ----------------------------------------------------------------------------- step model
def smape(y: np.ndarray, yhat: np.ndarray) -> float:
    """Standard SMAPE in percent: mean(2|y - yhat| / (|y| + |yhat|))."""
    y = np.asarray(y, float)
    yhat = np.asarray(yhat, float)
    den = np.abs(y) + np.abs(yhat)
    ok = den > 0
    return float(np.mean(2 * np.abs(y - yhat)[ok] / den[ok]) * 100) if ok.any() else float("nan")


def _errors(y: np.ndarray, yhat: np.ndarray) -> dict[str, float]:
    ape = np.abs(yhat - y) / np.maximum(np.abs(y), 1e-9) * 100
    return {
        "steps": int(len(y)),
        "mape_pct": round(float(np.mean(ape)), 3),
        "median_ape_pct": round(float(np.median(ape)), 3),
        "smape_pct": round(smape(y, yhat), 3),
    }


def fit_step_model(
    features: pd.DataFrame, holdout_frac: float = 0.25, seed: int = 0,
    cuda_graph_max_tokens: int = 512,
) -> tuple[StepTimeModel, dict[str, Any]]:
    """NNLS fit of the step-time model, whole runs held out per sweep; returns (model, report).

    ``features`` has one row per measured step: the columns of ``design_matrix``'s arguments
    (prefill_tokens, decode_seqs, ctx_tokens, lora_adapters, lora_enabled, max_lora_rank) plus
    step_ms, run, sweep. Each run is weighted equally (not each step) so
    that long sweeps do not drown short ones, and the fit minimises relative error (rows are
    scaled by 1/step_ms), which is what SMAPE-type figures judge.
    """
    rng = np.random.default_rng(seed)
    held: set[tuple[str, str]] = set()
    for sweep, grp in features.groupby("sweep"):
        runs = sorted(grp["run"].unique())
        k = int(round(len(runs) * holdout_frac)) if len(runs) >= 3 else 0
        for r in rng.permutation(runs)[:k]:
            held.add((sweep, r))
    key = list(zip(features["sweep"], features["run"], strict=True))
    is_test = np.array([k in held for k in key])

    x = _design(features, cuda_graph_max_tokens)
    y = features["step_ms"].to_numpy(float)
    dropped = unidentifiable_features(features)
    for name in dropped:
        x[:, FEATURES.index(name)] = 0.0  # NNLS then leaves its coefficient at 0
    counts = features.groupby(["sweep", "run"])["step_ms"].transform("size").to_numpy(float)
    w = 1.0 / np.sqrt(counts) / y
    train = ~is_test
    coef, _ = nnls(x[train] * w[train, None], y[train] * w[train], maxiter=50 * x.shape[1])
    model = StepTimeModel.from_vector(coef, cuda_graph_max_tokens)
    pred = x @ coef
    report: dict[str, Any] = {
        "features": list(FEATURES),
        "fixed_at_zero": {name: UNIDENTIFIABLE_WHY[name] for name in dropped},
        "held_out_runs": sorted(f"{s}/{r}" for s, r in held),
        "train": _errors(y[train], pred[train]),
        "held_out": _errors(y[is_test], pred[is_test]) if is_test.any() else None,
        # what predicting every held-out step at the training steps' median would score: the
        # yardstick for how much of the step-time variation the model explains
        "held_out_constant": (
            _errors(y[is_test], np.full(int(is_test.sum()), np.median(y[train])))
            if is_test.any() else None
        ),
        "held_out_by_sweep": [],
    }
    for sweep in sorted(features["sweep"].unique()):
        m = is_test & (features["sweep"] == sweep).to_numpy()
        if m.any():
            report["held_out_by_sweep"].append({"sweep": sweep, **_errors(y[m], pred[m])})
    return model, report


UNIDENTIFIABLE_WHY = {
    "lora_slot_mtokens": "LoRA steps of >= 64 tokens were measured at a single max_loras, so the "
    "slot term cannot be told apart from the per-token term",
    "lora_adapters": "no LoRA step with more than one distinct adapter",
    "lora_adapter_rank_tiles": "LoRA steps were measured at one cdiv(max_lora_rank, 16) only",
}
MIN_TOKENS = 64


def unidentifiable_features(features: pd.DataFrame) -> list[str]:
    """Features the data cannot pin down: fitting them would only absorb noise that the model
    then extrapolates."""
    tokens = features["prefill_tokens"] + features["decode_seqs"]
    lora = features["lora_enabled"] > 0
    out = []
    if features.loc[lora & (tokens >= MIN_TOKENS), "max_loras"].nunique() < 2:
        out.append("lora_slot_mtokens")
    if not (lora & (features["lora_adapters"] > 1)).any():
        out.append("lora_adapters")
    if len(np.unique(rank_tiles(features.loc[lora, "max_lora_rank"].to_numpy(float)))) < 2:
        out.append("lora_adapter_rank_tiles")
    return out


def _design(features: pd.DataFrame, cuda_graph_max_tokens: int) -> np.ndarray:
    return design_matrix(
        prefill_tokens=features["prefill_tokens"].to_numpy(float),
        decode_seqs=features["decode_seqs"].to_numpy(float),
        ctx_tokens=features["ctx_tokens"].to_numpy(float),
        lora_adapters=features["lora_adapters"].to_numpy(float),
        lora_enabled=features["lora_enabled"].to_numpy(float),
        max_lora_rank=features["max_lora_rank"].to_numpy(float),
        max_loras=features["max_loras"].to_numpy(float),
        cuda_graph_max_tokens=cuda_graph_max_tokens,
    )


MIN_SKIP_STEPS = 100


def fit_scan_cost(features: pd.DataFrame) -> tuple[float | None, dict[str, Any]]:
    """Scheduler cost per waiting request the waiting loop examines and passes over (µs).

    Fitted on the measured ``scheduler_ms`` (the part of a step spent in ``schedule()``), where
    the effect is visible, not on step times, where 0.2 µs x 50 requests is lost in the noise.
    Within-run least squares (each run's own mean removed) on decode sequences, admissions and
    skipped requests, so whatever is constant within a run cannot leak into the skip cost.
    Returns (None, why) when no run's steps vary in how many requests they skip.
    """
    need = {"scanned", "scheduler_ms", "admitted", "decode_seqs", "run"}
    if not need <= set(features.columns):
        return None, {"why": "no scheduler_ms or reconstructed queue scans in the step logs"}
    g = features[np.isfinite(features["scanned"]) & np.isfinite(features["scheduler_ms"])].copy()
    g["skipped"] = (g["scanned"] - g["admitted"]).clip(lower=0)
    varies = g.groupby("run")["skipped"].transform("std").fillna(0) > 0
    if int(varies.sum()) < MIN_SKIP_STEPS:
        return None, {
            "why": f"fewer than {MIN_SKIP_STEPS} steps in runs whose waiting loop skipped a "
            "varying number of requests (needs max_loras below the adapters waiting)"
        }
    g = g[varies]
    cols = ["decode_seqs", "admitted", "skipped"]
    demeaned = g[[*cols, "scheduler_ms"]] - g.groupby("run")[[*cols, "scheduler_ms"]].transform(
        "mean"
    )
    coef, *_ = np.linalg.lstsq(
        demeaned[cols].to_numpy(float), demeaned["scheduler_ms"].to_numpy(float), rcond=None
    )
    us = max(float(coef[2]) * 1e3, 0.0)
    return us, {
        "scan_us_per_waiting": round(us, 4),
        "steps": int(len(g)),
        "runs": int(g["run"].nunique()),
        "max_skipped": int(g["skipped"].max()),
    }


# ----------------------------------------------------------------------------- the whole profile
def _readme_fact(readme: str, label: str, default: str) -> str:
    for line in readme.splitlines():
        if line.startswith(f"| {label} |"):
            return line.split("|")[2].strip()
    return default


def calibrate_reference(
    data_dir: Path,
    model: str,
    *,
    name: str | None = None,
    gpu: str | None = None,
    seed: int = 0,
    vllm_version: str | None = None,
    quirks: SchedulerQuirks | None = None,
) -> tuple[Profile, dict[str, Any]]:
    """Fit KV capacity, load latencies and the step-time model for ``model``; returns the
    profile and the fit report (held-out step errors)."""

    ref = load_reference(data_dir, model)
    meta = ref.meta
    kv = fit_kv_capacity(ref.kv, ref.runs)
    loads = fit_adapter_loads(ref.loads)
    features = reference_step_features(ref)
    graphs = int(meta.get("cuda_graph_max_tokens", 512))
    step_model, report = fit_step_model(features, seed=seed, cuda_graph_max_tokens=graphs)
    scan_us, report["scheduler_scan"] = fit_scan_cost(features)
    scheduler = quirks or SchedulerQuirks.from_dict(meta.get("scheduler") or {})
    if scan_us is not None:
        scheduler = replace(scheduler, scan_us_per_waiting=scan_us)
    if "max_model_len" in meta:
        max_model_len = int(meta["max_model_len"])
    else:
        max_len_col = ref.runs["max_model_len"].dropna()
        if max_len_col.empty:
            max_len_col = ref.kv["max_model_len"].dropna()
        if max_len_col.empty:
            raise CalibrationError("no max_model_len in profile_runs.csv or kv_capacity.csv")
        max_model_len = int(max_len_col.max())
    runs = ref.runs
    budget = runs["max_num_batched_tokens"].dropna()
    default_engine = {
        "max_num_seqs": 256,
        "max_num_batched_tokens": int(budget.mode().iloc[0]) if len(budget) else 2048,
        "block_size": 16,
        **(meta.get("default_engine") or {}),
    }
    profile = Profile(
        name=name or model,
        gpu=gpu or meta.get("gpu") or _gpu_from_readme(ref.readme),
        model=model,
        vllm_version=vllm_version or str(meta.get("vllm_version") or _vllm_from_readme(ref.readme)),
        max_model_len=max_model_len,
        step_model=step_model,
        kv_capacity=kv,
        adapter_loads=loads,
        scheduler=scheduler,
        default_engine=default_engine,
        fit_report=report,
        provenance={
            "data": str(Path(data_dir).name),
            "fitted_with": "lorafleet calibrate",
            "steps_used": int(len(features)),
            "runs_used": int(features.groupby(["sweep", "run"]).ngroups),
            "source": meta.get("source")
            or _readme_fact(ref.readme, "Source repository", "unknown"),
            "license": "Apache-2.0 measurement data (see data README)",
        },
    )
    # what the profiling runs say of the serving path, reported, not attached: on the H100
    # reference data the burst residual (41-61 ms, Qwen) made the 294 runs' TTFT SMAPE worse
    # (31.8 -> 40.6 % for Qwen): a 64-request burst queues in the frontend, a Poisson stream not
    term, found = fit_reference_serving_path(ref.runs, profile)
    report["serving_path"] = {**found, "candidate": term.to_dict() if term else None,
                              "attached": False}
    return profile, report


SERVER_BENCHMARKS = ("benchmark_serving.py",)  # runs measured by a client of an HTTP server


def fit_reference_serving_path(runs: pd.DataFrame, profile: Profile
                               ) -> tuple[ServingPath | None, dict[str, Any]]:
    """The serving-path term as far as profiling runs measured through a server identify it
    (None if they do not), and what was found.

    * Gaps: the client's ITL median against the median engine step of the same window. When
      they agree (within 1 %), the steps the profile was fitted on were timed under serving,
      contention included: step scale 1, no per-sequence cost, no gap noise identified.
    * TTFT: only prefill bursts that wait for nothing but prefill (every prompt admitted at
      once, one output token) give the path without a decode queue: the twin replays each
      (its few prefill steps included), and the median of measured - replayed TTFT p50 over
      at least two such runs is ``request_ms``."""
    found: dict[str, Any] = {}
    served = (runs[runs["benchmark_script"].isin(SERVER_BENCHMARKS)]
              if "benchmark_script" in runs else runs.iloc[0:0])
    if served.empty:
        return None, {"why": "no profiling run was measured through a server"}
    g = served[(served["itl_median_ms"] > 0) & served["median_step_ms_in_window"].notna()]
    ratio = (g["itl_median_ms"] / g["median_step_ms_in_window"]).to_numpy()
    found["itl_median_over_step_median"] = {
        "runs": int(len(ratio)), "median": float(np.median(ratio)) if len(ratio) else None,
        "p10": float(np.quantile(ratio, 0.1)) if len(ratio) else None,
        "p90": float(np.quantile(ratio, 0.9)) if len(ratio) else None}
    if not len(ratio) or abs(float(np.median(ratio)) - 1) > 0.01:
        return None, {**found, "why": "client gaps and engine steps disagree: the step model "
                      "does not hold the serving contention"}
    light = served[(served["num_prompts"] <= served["max_num_seqs"])
                   & (served["output_len"] == 1) & (served["completed"] == served["num_prompts"])]
    residuals = []
    for _, r in light.iterrows():
        n = int(r["num_prompts"])
        cfg = EngineConfig(enable_lora=bool(r.get("enable_lora", 0)),
                           max_num_seqs=int(r["max_num_seqs"]),
                           max_num_batched_tokens=int(r["max_num_batched_tokens"]),
                           max_loras=1, max_lora_rank=8)
        batch = RequestBatch(np.zeros(n), np.full(n, -1), np.full(n, int(r["input_len"])),
                             np.full(n, 1))
        twin = simulate_requests(batch, [8], cfg, profile, 600.0, serving=False)
        residuals.append(float(r["ttft_median_ms"]) - twin.metrics["ttft_median_ms"])
    found["ttft_residual_ms"] = {str(r): round(v, 2) for r, v in zip(light["run"], residuals,
                                                                     strict=True)}
    if len(residuals) < 2:
        return None, {**found, "why": f"{len(residuals)} profiling run(s) without a queue; "
                      "the TTFT term needs 2"}
    zero = (0.0,) * len(QUANTILE_LEVELS)
    term = ServingPath(step_scale=1.0, decode_seq_ms=0.0, prefill_token_ms=0.0,
                       request_ms=max(0.0, float(np.median(residuals))), prompt_token_ms=0.0,
                       ttft_noise_ms=zero, itl_noise_ms=zero, fitted_on=int(light["num_prompts"]
                                                                          .sum()),
                       source=f"lorafleet calibrate: {len(residuals)} prefill bursts "
                       f"({', '.join(map(str, light['run']))}) and {len(ratio)} runs' ITL")
    return term, found


def _gpu_from_readme(readme: str) -> str:
    return "H100-64GB" if "H100" in readme else "unknown"


def _vllm_from_readme(readme: str) -> str:
    for token in readme.replace("(", " ").split():
        if token.startswith("0.") and token.count(".") == 2 and token.replace(".", "").isdigit():
            return token
    return "unknown"
