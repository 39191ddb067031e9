"""The ``sim`` engine backend: the twin's timing in real time, placeholder tokens.

Why: the control plane (ingress, routing, telemetry, deploy/status) must be exercised at hundreds
of adapters and several replicas on a laptop without GPUs. This backend behaves like one vLLM
engine from the outside - same interface as orchestrator/serving/vllm_engine.py, tokens streamed one
step at a time - and each step lasts what the profile's step-time model
(``twin.latency.StepCost``, the twin engine's own) predicts for the batch it scheduled, plus the
profile's adapter-load latency when an adapter enters a GPU slot.

It is an *online approximation* of the twin's scheduler (twin/engine.py), kept small:

* each step: running requests first (decode = 1 token, an unfinished prefill its next chunk)
  within ``max_num_batched_tokens``; then waiting requests FCFS up to ``max_num_seqs``; a waiting
  request whose adapter is not in the step's adapter set is skipped when the set already has
  ``max_loras`` adapters (vLLM V1's LoRA admission rule);
* GPU adapter slots are an LRU of ``max_loras`` (a miss costs the profile's GPU load time);
* not modelled: KV-cache exhaustion and preemption (the tiny CPU model's cache holds ~1 M tokens;
  use the twin itself for saturated replicas), CPU-cache misses, EOS (every request produces
  exactly ``max_tokens`` placeholder tokens).

Prompt text is counted as one token per 4 characters (at least 1); token-id prompts count
exactly, which is what the load generators send.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.serving.backend import (
    BackendInfo,
    Delta,
    EngineUnavailable,
    GenerateRequest,
    UnknownModel,
    context_limit_error,
)
from twin.config import EngineConfig
from twin.latency import StepCost
from twin.profile import Profile

PLACEHOLDER_WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", " fleet", " twin", " step")
CHARS_PER_TOKEN = 4
MAX_CATCH_UP_S = 2.0  # host stalls up to this long do not cost the simulated engine throughput


def count_text_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@dataclass(eq=False)
class _Seq:
    id: int
    adapter: str | None
    prompt_tokens: int
    max_tokens: int
    out: asyncio.Queue[Delta]
    prefilled: int = 0
    generated: int = 0
    done: bool = False

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prompt_tokens


@dataclass
class SimEngine:
    """Real-time engine loop over the profile's step-time model (module docstring)."""

    engine: EngineConfig
    profile: Profile
    adapters: Mapping[str, int]  # id -> rank
    max_model_len: int = 0  # 0: the engine config's, else the profile's
    time_scale: float = 1.0  # >1 runs faster than real time (tests)
    kind: str = "sim"
    _waiting: deque[_Seq] = field(default_factory=deque, init=False)
    _running: list[_Seq] = field(default_factory=list, init=False)
    _gpu_slots: OrderedDict[str, None] = field(default_factory=OrderedDict, init=False)
    _wake: asyncio.Event | None = field(default=None, init=False)
    _task: asyncio.Task | None = field(default=None, init=False)
    _ids: itertools.count = field(default_factory=itertools.count, init=False)
    steps: int = field(default=0, init=False)
    busy_ms: float = field(default=0.0, init=False)  # the twin's time of the steps taken
    _ranks: dict[str, int] = field(default_factory=dict, init=False)
    _cost: StepCost | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._cost = StepCost.for_engine(
            self.profile.step_model, lora_enabled=self.engine.enable_lora,
            max_lora_rank=self.engine.max_lora_rank, max_loras=self.engine.max_loras)
        if not self.max_model_len:
            self.max_model_len = self.profile.effective_max_model_len(self.engine)
        too_big = [a for a, r in self.adapters.items() if r > self.engine.max_lora_rank]
        if too_big:
            raise ValueError(f"adapters {too_big[:5]} exceed max_lora_rank "
                             f"{self.engine.max_lora_rank}")
        self._ranks = dict(self.adapters)

    async def start(self) -> BackendInfo:
        t0 = time.perf_counter()
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return BackendInfo("sim", f"sim:{self.profile.name}", self.max_model_len,
                           tuple(self.adapters), {"engine_start_s": time.perf_counter() - t0,
                                                  "profile": self.profile.name})

    def loaded_adapters(self) -> Sequence[str]:
        return tuple(self.adapters)

    async def set_adapters(self, adapters: Sequence[Any]) -> None:
        ranks = {a.id: int(a.rank) for a in adapters}
        too_big = [a for a, r in ranks.items() if r > self.engine.max_lora_rank]
        if too_big:
            raise ValueError(f"adapters {too_big[:5]} exceed max_lora_rank "
                             f"{self.engine.max_lora_rank}")
        self._ranks.update(ranks)  # running requests of a dropped adapter still cost its rank
        self.adapters = ranks

    def queue_depth(self) -> tuple[int, int]:
        return len(self._running), len(self._waiting)

    async def check_health(self) -> None:
        if self._task is None or self._task.done():
            raise EngineUnavailable("the sim engine loop is not running")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for s in [*self._running, *self._waiting]:
            s.out.put_nowait(Delta(finish_reason="abort"))
        self._running.clear()
        self._waiting.clear()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if self._task is None or self._wake is None:
            raise EngineUnavailable("the sim engine is not running")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise UnknownModel(f"adapter {request.adapter!r} is not held by this replica",
                               param="model")
        if request.prompt_token_ids is not None:
            n_prompt = len(request.prompt_token_ids)
        elif request.prompt is not None:
            n_prompt = count_text_tokens(request.prompt)
        else:
            n_prompt = sum(count_text_tokens(c) + 4 for _, c in request.messages or ())
        if n_prompt + request.max_tokens > self.max_model_len:
            raise context_limit_error(n_prompt, request.max_tokens, self.max_model_len)
        seq = _Seq(next(self._ids), request.adapter, max(1, n_prompt), request.max_tokens,
                   asyncio.Queue())
        self._waiting.append(seq)
        self._wake.set()
        yield Delta(prompt_tokens=n_prompt)
        try:
            while True:
                d = await seq.out.get()
                yield d
                if d.finish_reason is not None:
                    return
        finally:
            if not seq.done:  # the client went away: free the slot as vLLM's abort does
                seq.done = True
                if seq in self._running:
                    self._running.remove(seq)
                elif seq in self._waiting:
                    self._waiting.remove(seq)

    # -- the engine loop ----------------------------------------------------------------------
    def _schedule(self) -> list[tuple[_Seq, int]]:
        e = self.engine
        budget = e.max_num_batched_tokens
        batch: list[tuple[_Seq, int]] = []
        adapters: set[str] = {s.adapter for s in self._running if s.adapter is not None}
        for s in self._running:
            if budget <= 0:
                break
            n = min(s.prompt_tokens - s.prefilled, budget) if s.in_prefill else 1
            batch.append((s, n))
            budget -= n
        skipped: list[_Seq] = []
        while self._waiting and budget > 0 and len(self._running) < e.max_num_seqs:
            s = self._waiting.popleft()
            if (s.adapter is not None and s.adapter not in adapters
                    and len(adapters) >= e.max_loras):
                skipped.append(s)
                continue
            if s.adapter is not None:
                adapters.add(s.adapter)
            n = min(s.prompt_tokens, budget)
            self._running.append(s)
            batch.append((s, n))
            budget -= n
        self._waiting.extendleft(reversed(skipped))
        return batch

    def _step_ms(self, batch: list[tuple[_Seq, int]]) -> float:
        e, prof = self.engine, self.profile
        prefill = sum(n for s, n in batch if s.in_prefill)
        decode = sum(1 for s, _ in batch if not s.in_prefill)
        ctx = sum(s.prefilled + s.generated + n for s, n in batch)
        used = {s.adapter for s, _ in batch if s.adapter is not None}
        load_ms = 0.0
        for a in used:
            if a in self._gpu_slots:
                self._gpu_slots.move_to_end(a)
                continue
            load_ms += prof.adapter_loads.gpu_load_ms(e.max_lora_rank, self._ranks[a])
            self._gpu_slots[a] = None
            if len(self._gpu_slots) > e.max_loras:
                self._gpu_slots.popitem(last=False)
        assert self._cost is not None
        return max(0.0, self._cost.ms(prefill, decode, ctx, len(used))) + load_ms

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        word = itertools.cycle(PLACEHOLDER_WORDS)
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                next_t = loop.time()
            batch = self._schedule()
            if not batch:  # everything waiting is blocked by the LoRA rule: cannot happen twice
                await asyncio.sleep(0.001)
                continue
            # the engine keeps the twin's timeline: a step that started late (the host was
            # busy: a shared test machine, not the GPU this stands for) is caught up by the
            # next ones, up to MAX_CATCH_UP_S behind; a longer stall is lost time
            step_ms = self._step_ms(batch)
            next_t = max(next_t, loop.time() - MAX_CATCH_UP_S) + step_ms / 1e3 / self.time_scale
            await asyncio.sleep(max(0.0, next_t - loop.time()))
            self.steps += 1
            self.busy_ms += step_ms
            for s, n in batch:
                if s.done:
                    continue
                if s.in_prefill:
                    s.prefilled += n
                    if s.in_prefill:
                        continue  # chunked prefill: no token yet
                s.generated += 1
                finished = s.generated >= s.max_tokens
                s.out.put_nowait(Delta(text=next(word), n_tokens=1,
                                       finish_reason="length" if finished else None))
                if finished:
                    s.done = True
                    self._running.remove(s)
