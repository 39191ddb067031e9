"""The ``sim`` serving backend drives the twin's own engine in real time: KV exhaustion and
preemption, the CPU cache, aborts, and the same decisions as the offline twin."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import make_profile

from orchestrator.serving.backend import GenerateRequest
from orchestrator.serving.sim_engine import SimEngine
from twin.config import EngineConfig
from twin.engine import run_engine

CFG = EngineConfig(max_loras=2, max_cpu_loras=2, max_lora_rank=8, max_num_seqs=16,
                   max_num_batched_tokens=256, block_size=16)


async def _stream(eng: SimEngine, adapter: str | None, prompt: int, out: int) -> int:
    n = 0
    async for d in eng.generate(GenerateRequest(adapter or "base", adapter, out,
                                                prompt_token_ids=(7,) * prompt)):
        n += d.n_tokens
    return n


def _run(eng: SimEngine, jobs: list[tuple[str | None, int, int]], timeout_s: float = 120.0):
    async def main() -> list[int]:
        await eng.start()
        try:
            return await asyncio.wait_for(
                asyncio.gather(*[_stream(eng, *j) for j in jobs]), timeout_s)
        finally:
            await eng.stop()

    return asyncio.run(main())


def test_kv_exhaustion_preempts_and_every_token_is_still_streamed() -> None:
    """Eight 40+120-token requests on a 640-token KV cache cannot all hold their KV: the
    newest are preempted and recomputed, and each stream still gets its 120 tokens."""
    prof = make_profile(kv_tokens=640, max_model_len=256, const_ms=1.0)
    eng = SimEngine(CFG, prof, {"a": 8}, time_scale=50.0)
    # all eight arrive at once whatever the host does meanwhile: on a loaded host the real
    # clock (x50) moved on between their submissions, and the first finished before the last
    # arrived - no KV contention, no preemption
    eng._sim_now = lambda: 0.0  # type: ignore[method-assign]
    counts = _run(eng, [("a", 40, 120)] * 8)
    assert counts == [120] * 8
    assert eng.preemptions > 0
    assert eng.queue_depth() == (0, 0)


def test_cpu_cache_misses_cost_disk_loads() -> None:
    """max_cpu_loras=1 and three adapters used one after another: adapters b and c are not in
    the CPU cache (only the first is preloaded), so their steps add the disk load time."""
    prof = make_profile(const_ms=5.0, disk_load_ms=30.0, gpu_load_ms=2.0)
    cfg = EngineConfig(max_loras=1, max_cpu_loras=1, max_lora_rank=8, max_num_seqs=4,
                       max_num_batched_tokens=64)
    eng = SimEngine(cfg, prof, {"a": 8, "b": 8, "c": 8}, time_scale=20.0)

    async def main() -> None:
        await eng.start()
        for a in ("a", "b", "c"):  # one at a time: each a 1-step prefill + 1 decode
            assert await _stream(eng, a, 4, 2) == 2
        await eng.stop()

    asyncio.run(main())
    # 6 steps of 5 ms; gpu loads for a, b, c (3 x 2 ms); disk loads for b and c (2 x 30 ms)
    assert eng.steps == 6
    assert eng.busy_ms == pytest.approx(6 * 5.0 + 3 * 2.0 + 2 * 30.0)
    assert eng.core.disk_loads == 2


def test_the_engine_runs_back_to_back_when_the_real_clock_lags_its_steps() -> None:
    """Timers fire up to the clock's resolution early, so the real clock can be a hair short of
    the last step's end; the next step must still start (a frozen clock is the extreme)."""
    prof = make_profile(const_ms=2.0)
    eng = SimEngine(CFG, prof, {"a": 8}, time_scale=10.0)
    eng._sim_now = lambda: 0.0  # type: ignore[method-assign]  # never reaches a step's end
    assert _run(eng, [("a", 8, 20), ("a", 8, 5)], timeout_s=60.0) == [20, 5]


def test_an_abandoned_request_frees_its_slot_and_the_rest_complete() -> None:
    """A client that goes away mid-stream (running) or before admission (waiting) is aborted
    in the engine, as vLLM's abort does: nothing is left running or waiting."""
    prof = make_profile(const_ms=2.0)
    cfg = EngineConfig(max_loras=1, max_cpu_loras=2, max_lora_rank=8, max_num_seqs=1,
                       max_num_batched_tokens=64)
    eng = SimEngine(cfg, prof, {"a": 8, "b": 8}, time_scale=10.0)

    async def main() -> tuple[int, tuple[int, int]]:
        await eng.start()
        long_a = eng.generate(GenerateRequest("x", "a", 1000, prompt_token_ids=(1,) * 4))
        await long_a.__anext__()  # accepted
        waiting_b = eng.generate(GenerateRequest("y", "b", 1000, prompt_token_ids=(1,) * 4))
        await waiting_b.__anext__()
        await long_a.__anext__()  # a is running (max_num_seqs=1: b waits)
        await long_a.aclose()
        await waiting_b.aclose()
        done = await asyncio.wait_for(_stream(eng, "b", 4, 3), 60)
        depth = eng.queue_depth()
        await eng.stop()
        return done, depth

    done, depth = asyncio.run(main())
    assert done == 3 and depth == (0, 0)


def test_live_decisions_equal_the_offline_twin_on_the_same_arrivals() -> None:
    """Replaying the arrivals the live backend saw through ``run_engine`` gives every request
    the same first-token and finish time: the real-time driver adds no scheduling of its own.
    (Bursts of ten on a 320-token KV cache: preemptions happen, whatever the host's speed.)"""
    prof = make_profile(kv_tokens=320, max_model_len=256, const_ms=1.0,
                        prefill_ms_per_token=0.01, decode_ms_per_seq=0.05, gpu_load_ms=1.0)
    ranks = {"a": 8, "b": 8, "c": 8, "d": 8}
    eng = SimEngine(CFG, prof, ranks, time_scale=20.0)
    rng = np.random.default_rng(3)
    jobs = [(str(rng.choice(list(ranks))), int(rng.integers(4, 100)), int(rng.integers(2, 80)))
            for _ in range(40)]

    async def main() -> list[int]:
        await eng.start()

        async def later(k: int, job: tuple[str, int, int]) -> int:
            await asyncio.sleep(0.02 * (k // 10))  # four bursts of ten
            return await _stream(eng, *job)

        out = await asyncio.wait_for(
            asyncio.gather(*[later(k, j) for k, j in enumerate(jobs)]), 120)
        await eng.stop()
        return out

    assert asyncio.run(main()) == [j[2] for j in jobs]
    t = eng.core.requests()
    offline = run_engine(t["arrival_s"], t["adapter"], t["prompt_len"], t["output_len"],
                         list(ranks.values()), CFG, prof, 1e9)
    np.testing.assert_array_equal(offline.first_token_s, t["first_token_s"])
    np.testing.assert_array_equal(offline.finish_s, t["finish_s"])
    assert offline.preemptions.sum() == eng.preemptions > 0
