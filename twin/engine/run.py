"""``run_engine``: a whole workload through one ``EngineCore`` in simulated time."""

from __future__ import annotations

import time

import numpy as np

from twin.config import EngineConfig
from twin.engine.core import EngineCore
from twin.engine.result import EngineResult
from twin.profile import Profile


def run_engine(
    arrival_s: np.ndarray,
    adapter: np.ndarray,
    prompt_len: np.ndarray,
    output_len: np.ndarray,
    adapter_ranks: list[int] | np.ndarray,
    config: EngineConfig,
    profile: Profile,
    duration_s: float,
    *,
    timeseries_interval_s: float = 10.0,
    record_trace: bool = False,
    preload_cpu: bool = True,
    client_max_inflight: int | None = None,
) -> EngineResult:
    """Emulate one engine on arrival-sorted requests until ``duration_s`` of simulated time.

    A pure function of its inputs (no randomness inside): identical inputs give identical output.
    ``adapter[i] == -1`` is a base-model request. ``preload_cpu`` registers the adapters in the
    CPU cache at start (the reference servers pre-register theirs), up to ``max_cpu_loras``.
    ``client_max_inflight`` models a load generator that cannot hold more requests in flight
    (e.g. one TCP connection per request and a finite ephemeral-port range): a request arriving
    while that many are running or waiting fails at once and is never served.
    """
    wall0 = time.perf_counter()
    core = EngineCore(config, profile, adapter_ranks, preload_cpu=preload_cpu,
                      client_max_inflight=client_max_inflight, record_trace=record_trace,
                      timeseries_interval_s=timeseries_interval_s,
                      capacity=max(len(arrival_s), 1))
    core.submit_all(arrival_s, adapter, prompt_len, output_len)
    core.advance(duration_s)
    return core.result(duration_s, time.perf_counter() - wall0)
