"""What an engine run returns: per-request outcomes, ITL samples, timeseries, an optional trace."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepTrace:
    """Per-step features and durations (only collected when asked: calibration, debugging)."""

    prefill_tokens: list[int] = field(default_factory=list)
    decode_seqs: list[int] = field(default_factory=list)
    ctx_tokens: list[int] = field(default_factory=list)
    lora_adapters: list[int] = field(default_factory=list)
    loads: list[int] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)  # requests newly admitted this step
    scanned: list[int] = field(default_factory=list)  # waiting requests the waiting loop examined
    finished: list[int] = field(default_factory=list)  # requests that finished in this step
    step_ms: list[float] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)

    def record(self, prefill: int, decode: int, ctx: int, adapters: int, loads: int,
               admitted: int, scanned: int, step_ms: float, start_s: float) -> None:
        """One step's features (``finished`` is appended after its update)."""
        self.prefill_tokens.append(prefill)
        self.decode_seqs.append(decode)
        self.ctx_tokens.append(ctx)
        self.lora_adapters.append(adapters)
        self.loads.append(loads)
        self.admitted.append(admitted)
        self.scanned.append(scanned)
        self.step_ms.append(step_ms)
        self.start_s.append(start_s)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.__dict__.items()}


@dataclass
class EngineResult:
    """Raw outcome of one engine run; ``twin.metrics`` turns it into the benchmark's figures."""

    first_token_s: np.ndarray  # nan where no token was produced
    finish_s: np.ndarray  # nan where unfinished
    generated: np.ndarray  # output tokens produced (at the end of the run)
    preemptions: np.ndarray  # per request
    rejected: np.ndarray  # bool: longer than max_model_len
    dropped: np.ndarray  # bool: failed at the client (client_max_inflight reached)
    itl_gap_ms: np.ndarray  # decode-step durations (consecutive equal ones merged) ...
    itl_weight: np.ndarray  # ... and how many decode tokens they produced
    preempt_gap_ms: np.ndarray  # extra inter-token gaps of requests resumed after preemption
    engine_steps: int
    simulated_s: float
    wall_s: float
    kv_blocks_total: int
    gpu_loads: int
    disk_loads: int
    timeseries: dict[str, np.ndarray]
    trace: StepTrace | None = None
