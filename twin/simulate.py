"""One twin run: (workload, engine config, profile, seed) -> metrics. A pure function.

This is the unit that placement evaluates, Ray tasks ship, and caches key on: no global state,
no randomness but the seed, identical inputs give bit-identical results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twin.config import ConfigError, EngineConfig, smallest_valid_rank
from twin.engine import EngineResult, run_engine
from twin.engine.quantiles import weighted_quantiles as selected_quantiles
from twin.metrics import RequestRecords, aggregate_metrics, per_adapter_metrics
from twin.profile import Profile
from twin.workload import RequestBatch, Workload, generate_requests


@dataclass
class SimResult:
    """Everything a run produced: summary, per-adapter table, per-request records, time series."""

    metrics: dict[str, Any]
    per_adapter: list[dict[str, Any]]
    records: RequestRecords
    timeseries: dict[str, np.ndarray]
    engine: EngineResult
    # the inter-token gaps the ITL figures pooled (the client's when the serving path applied)
    itl_gaps_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    itl_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def summary(self) -> dict[str, Any]:
        """The JSON-able summary printed by `lorafleet simulate --json`."""
        return dict(self.metrics)


def check_adapter_ranks(ranks: list[int], ids: list[str], max_lora_rank: int) -> None:
    """vLLM refuses to load an adapter whose rank exceeds the slot rank: fail before simulating."""
    too_big = [(i, r) for i, r in zip(ids, ranks, strict=True) if r > max_lora_rank]
    if too_big:
        shown = ", ".join(f"{i} (rank {r})" for i, r in too_big[:5])
        more = f" and {len(too_big) - 5} more" if len(too_big) > 5 else ""
        need = smallest_valid_rank(max(r for _, r in too_big))
        raise ConfigError(
            f"max_lora_rank: {max_lora_rank} is below the rank of adapter(s) {shown}{more}; "
            f"use max_lora_rank >= {need}"
        )


def build_engine_config(
    workload: Workload,
    profile: Profile,
    *,
    max_loras: int,
    max_cpu_loras: int | None = None,
    max_lora_rank: int | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
) -> EngineConfig:
    """An EngineConfig for serving ``workload`` on ``profile``'s GPU, with sensible defaults.

    Defaults: every adapter fits in the CPU cache (how servers that register their adapters at
    start run), the smallest slot rank that holds the largest adapter, and the profile's
    ``default_engine`` values (vLLM's own defaults on that GPU) for the rest.
    """
    ranks = [a.rank for a in workload.adapters]
    rank = max_lora_rank if max_lora_rank is not None else smallest_valid_rank(max(ranks or [1]))
    defaults = profile.default_engine
    config = EngineConfig(
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras if max_cpu_loras is not None else max(max_loras, len(ranks)),
        max_lora_rank=rank,
        max_num_seqs=max_num_seqs or int(defaults.get("max_num_seqs", 256)),
        max_num_batched_tokens=max_num_batched_tokens
        or int(defaults.get("max_num_batched_tokens", 2048)),
        block_size=int(defaults.get("block_size", 16)),
    )
    check_adapter_ranks(ranks, [a.id for a in workload.adapters], config.max_lora_rank)
    profile.check_feasible(config)
    return config


def simulate_requests(
    requests: RequestBatch,
    adapter_ranks: list[int],
    config: EngineConfig,
    profile: Profile,
    duration_s: float,
    adapter_ids: list[str] | None = None,
    *,
    record_trace: bool = False,
    timeseries_interval_s: float = 10.0,
    client_max_inflight: int | None = None,
    serving: bool = True,
    seed: int = 0,
) -> SimResult:
    """Run the engine on an explicit request batch (replayed traces, calibration sweeps).

    With ``serving`` (the default) and a profile that measured its serving path, the figures are
    a client's: the engine's steps scaled by the path's contention, its TTFT and gaps added
    (``twin.serving_path``; ``seed`` seeds their noise draws). ``serving=False``, or a profile
    without the term, times the engine alone; ``metrics["latency_view"]`` says which."""
    ids = adapter_ids or [str(i) for i in range(len(adapter_ranks))]
    used = sorted(set(requests.adapter[requests.adapter >= 0].tolist()))
    check_adapter_ranks(
        [adapter_ranks[i] for i in used], [ids[i] for i in used], config.max_lora_rank
    )
    term = profile.serving_path if serving else None
    if term is not None:
        profile = profile.serving()
    eng = run_engine(
        requests.arrival_s,
        requests.adapter,
        requests.prompt_len,
        requests.output_len,
        adapter_ranks,
        config,
        profile,
        duration_s,
        record_trace=record_trace,
        timeseries_interval_s=timeseries_interval_s,
        client_max_inflight=client_max_inflight,
    )
    first, finish = eng.first_token_s, eng.finish_s
    # every gap a client waits between tokens: the steps' and the preemptions' (weight 1 each)
    gaps = np.concatenate([eng.itl_gap_ms, eng.preempt_gap_ms])
    gap_w = np.concatenate([np.asarray(eng.itl_weight, dtype=float),
                            np.ones(len(eng.preempt_gap_ms))])
    if term is not None:
        first, finish = term.apply(requests.arrival_s, requests.prompt_len, first, finish, seed)
        gaps, gap_w = term.itl_gaps(gaps, gap_w, seed)
    rec = RequestRecords(
        arrival_s=requests.arrival_s,
        adapter=requests.adapter,
        prompt_len=requests.prompt_len,
        output_len=requests.output_len,
        first_token_s=first,
        finish_s=finish,
        generated=eng.generated,
        preemptions=eng.preemptions,
        rejected=eng.rejected,
    )
    metrics = aggregate_metrics(
        rec, duration_s, gaps, gap_w, np.zeros(0), quantiles=selected_quantiles,
    )
    metrics.update(
        {
            "latency_view": "client" if term is not None else "engine",
            "client_dropped": int(eng.dropped.sum()),
            "simulated_s": eng.simulated_s,
            "wall_s": eng.wall_s,
            "engine_steps": eng.engine_steps,
            "speedup_vs_realtime": eng.simulated_s / eng.wall_s if eng.wall_s > 0 else None,
            "kv_cache_tokens": eng.kv_blocks_total * config.block_size,
            "gpu_adapter_loads": eng.gpu_loads,
            "disk_adapter_loads": eng.disk_loads,
        }
    )
    return SimResult(
        metrics=metrics,
        per_adapter=per_adapter_metrics(rec, duration_s, ids),
        records=rec,
        timeseries=eng.timeseries,
        engine=eng,
        itl_gaps_ms=gaps,
        itl_weights=gap_w,
    )


def simulate(
    workload: Workload,
    config: EngineConfig,
    profile: Profile,
    seed: int = 0,
    duration_s: float | None = None,
    *,
    record_trace: bool = False,
    client_max_inflight: int | None = None,
    serving: bool = True,
) -> SimResult:
    """Generate the workload's requests with ``seed`` and run one engine on them.

    ``client_max_inflight``: see ``twin.engine.run_engine`` (None: an unbounded client);
    ``serving``: see ``simulate_requests``.
    """
    window = float(duration_s if duration_s is not None else workload.duration_s)
    requests = generate_requests(workload, window, seed=seed)
    return simulate_requests(
        requests,
        [a.rank for a in workload.adapters],
        config,
        profile,
        window,
        [a.id for a in workload.adapters],
        record_trace=record_trace,
        client_max_inflight=client_max_inflight,
        serving=serving,
        seed=seed,
    )
