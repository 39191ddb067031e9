"""The ``sim`` engine backend: the twin's own engine in real time, placeholder tokens.

Why: the control plane (ingress, routing, telemetry, deploy/status) must be exercised at hundreds
of adapters and several replicas on a laptop without GPUs, against the engine placement trusts.
This backend behaves like one vLLM engine from the outside - same interface as
orchestrator/serving/vllm_engine.py, tokens streamed one step at a time - and inside it drives
``twin.engine.EngineCore``, the twin's engine, in real time: the same scheduler (token budget,
FCFS, the ``max_loras`` rule), KV exhaustion and preemption, the GPU slots and CPU cache with
their load times, and the step time of ``twin.latency``. Each step is delivered when the real
clock reaches its end.

Not modelled: EOS (every request produces exactly ``max_tokens`` placeholder tokens). Prompt
text is counted as one token per 4 characters (at least 1); token-id prompts count exactly, which
is what the load generators send.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
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
from twin.engine import EngineCore
from twin.profile import Profile

PLACEHOLDER_WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", " fleet", " twin", " step")
CHARS_PER_TOKEN = 4
MAX_CATCH_UP_S = 2.0  # host stalls up to this long do not cost the simulated engine throughput


def count_text_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@dataclass(eq=False)
class _Seq:
    """A request in flight: its engine id, its stream and the tokens sent so far."""

    rid: int
    out: asyncio.Queue[Delta]
    emitted: int = 0
    done: bool = False


@dataclass
class SimEngine:
    """Real-time driver of the twin's ``EngineCore`` (module docstring)."""

    engine: EngineConfig
    profile: Profile
    adapters: Mapping[str, int]  # id -> rank
    max_model_len: int = 0  # 0: the engine config's, else the profile's
    time_scale: float = 1.0  # >1 runs faster than real time (tests)
    kind: str = "sim"
    _core: EngineCore | None = field(default=None, init=False)
    _index: dict[str, int] = field(default_factory=dict, init=False)  # adapter id -> index
    _live: dict[int, _Seq] = field(default_factory=dict, init=False)  # rid -> stream
    _wake: asyncio.Event | None = field(default=None, init=False)
    _task: asyncio.Task | None = field(default=None, init=False)
    _t0: float = field(default=0.0, init=False)  # real time of the engine's time 0
    _last_arrival: float = field(default=0.0, init=False)
    steps: int = field(default=0, init=False)
    busy_ms: float = field(default=0.0, init=False)  # the twin's time of the steps taken

    def __post_init__(self) -> None:
        self._check_ranks(self.adapters)
        engine = self.engine
        if self.max_model_len:
            engine = dataclasses.replace(engine, max_model_len=self.max_model_len)
        self._index = {a: i for i, a in enumerate(self.adapters)}
        # the engine alone: a sim replica has no vLLM frontend, so no serving-path term (the
        # controller of a sim fleet plans without it too: control/actor.py)
        self._core = EngineCore(engine, self.profile.with_serving_path(None),
                                list(self.adapters.values()))
        self._core.collect = True
        self.max_model_len = self._core.max_len

    def _check_ranks(self, ranks: Mapping[str, int]) -> None:
        too_big = [a for a, r in ranks.items() if r > self.engine.max_lora_rank]
        if too_big:
            raise ValueError(f"adapters {too_big[:5]} exceed max_lora_rank "
                             f"{self.engine.max_lora_rank}")

    async def start(self) -> BackendInfo:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self._wake = asyncio.Event()
        self._t0 = loop.time()
        self._task = loop.create_task(self._loop())
        return BackendInfo("sim", f"sim:{self.profile.name}", self.max_model_len,
                           tuple(self.adapters), {"engine_start_s": loop.time() - t0,
                                                  "profile": self.profile.name})

    def loaded_adapters(self) -> Sequence[str]:
        return tuple(self.adapters)

    def residency(self) -> Mapping[str, Sequence[str]]:
        """The twin engine's own GPU slots and CPU cache, exactly."""
        if self._core is None:
            return {"gpu": [], "cpu": []}
        names = {i: a for a, i in self._index.items()}
        gpu, cpu = self._core.resident()
        return {"gpu": sorted(names[i] for i in gpu if i in names),
                "cpu": sorted(names[i] for i in cpu if i in names)}

    async def set_adapters(self, adapters: Sequence[Any]) -> None:
        ranks = {a.id: int(a.rank) for a in adapters}
        self._check_ranks(ranks)
        assert self._core is not None
        for a, r in ranks.items():  # a dropped adapter keeps its index: requests may still run
            if a not in self._index:
                self._index[a] = self._core.add_adapter(r)
        self.adapters = ranks

    @property
    def core(self) -> EngineCore:
        """The twin engine this backend drives (its request table holds every request's
        arrival, first token and finish in the engine's time)."""
        assert self._core is not None
        return self._core

    @property
    def preemptions(self) -> int:
        return self.core.preemptions

    def queue_depth(self) -> tuple[int, int]:
        assert self._core is not None
        return self._core.depth()

    async def check_health(self) -> None:
        if self._task is None or self._task.done():
            raise EngineUnavailable("the sim engine loop is not running")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for seq in self._live.values():
            seq.done = True
            seq.out.put_nowait(Delta(finish_reason="abort"))
        self._live.clear()

    def _sim_now(self) -> float:
        return (asyncio.get_running_loop().time() - self._t0) * self.time_scale

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if self._task is None or self._wake is None or self._core is None:
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
        arrival = max(self._sim_now(), self._last_arrival)
        self._last_arrival = arrival
        adapter = -1 if request.adapter is None else self._index[request.adapter]
        rid = self._core.submit(arrival, adapter, max(1, n_prompt), request.max_tokens)
        seq = self._live[rid] = _Seq(rid, asyncio.Queue())
        self._wake.set()
        yield Delta(prompt_tokens=n_prompt)
        try:
            while True:
                d = await seq.out.get()
                yield d
                if d.finish_reason is not None:
                    return
        finally:
            if not seq.done:  # the client went away: free what it holds, as vLLM's abort does
                seq.done = True
                self._live.pop(rid, None)
                self._core.abort(rid)

    # -- the engine loop ----------------------------------------------------------------------
    async def _loop(self) -> None:
        assert self._wake is not None and self._core is not None
        core, wake = self._core, self._wake
        loop = asyncio.get_running_loop()
        word = itertools.cycle(PLACEHOLDER_WORDS)
        while True:
            if not self._live:
                wake.clear()
                await wake.wait()
            # the engine runs back to back while it has work: its next step starts when the
            # last one ended, even if the real clock is a hair short of it (timers fire early
            # within the clock's resolution); every submitted request has arrived by then
            until = max(self._sim_now(), core.now, self._last_arrival)
            end = core.step(math.nextafter(until, math.inf))
            if end is None:  # nothing can start (all blocked): wait for a request or an abort
                wake.clear()
                await wake.wait()
                continue
            # the engine keeps the twin's timeline: a step that ended late (the host was busy:
            # a shared test machine, not the GPU this stands for) is caught up by the next ones,
            # up to MAX_CATCH_UP_S behind; a longer stall is lost time
            due = self._t0 + end / self.time_scale
            late = loop.time() - due
            if late > MAX_CATCH_UP_S:
                self._t0 += late - MAX_CATCH_UP_S
            elif late < 0:
                await asyncio.sleep(-late)
            self.steps += 1
            self.busy_ms += core.last_step_ms
            self._deliver(core, word)

    def _deliver(self, core: EngineCore, word: Any) -> None:
        """Send each live request the tokens the step produced, and the finish."""
        finished = set(core.last_finished)
        for rid, seq in list(self._live.items()):
            new = core.generated(rid) - seq.emitted
            for k in range(new):
                last = rid in finished and k == new - 1
                seq.out.put_nowait(Delta(text=next(word), n_tokens=1,
                                         finish_reason="length" if last else None))
            seq.emitted += new
            if rid in finished:
                seq.done = True
                del self._live[rid]
