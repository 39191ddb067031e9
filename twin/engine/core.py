"""``EngineCore``: one vLLM V1 engine serving LoRA adapters, advanced step by step.

Steppable: requests are ``submit``-ted as they arrive (or a whole workload at once),
``step(until)`` runs the next step that starts before ``until`` — schedule, predicted step time
(``twin.engine.step_time``, the compiled twin of ``twin.latency.StepCost.ms``), update from its
output — and returns when it ends; ``advance(until)`` runs every such step; ``abort`` frees what
a request holds. The offline twin (``run_engine``) and the live ``sim`` serving backend drive
this same object, one in simulated time, the other in real time. The state is
``twin.engine.state.EngineState``; the loop is compiled (``twin.engine.loop``); this class only
appends requests and reads results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numba import njit

from twin.config import EngineConfig
from twin.engine import loop, waiting
from twin.engine.lora_set import leave
from twin.engine.result import EngineResult, StepTrace
from twin.engine.running import generated, release
from twin.engine.state import (
    ABORTED,
    BS,
    BUDGET_MAX,
    CLIENT_CAP,
    COLLECT,
    CPU_N,
    CPU_SLOTS,
    DC,
    DISK_LOADS,
    DONE,
    DROPPED,
    FINISHED,
    FREE,
    GPU_LOADS,
    GPU_SLOTS,
    GRAB,
    LAST_MS,
    LORA_ON,
    MAX_LORAS,
    MAX_SEQS,
    MAXBLK,
    N_FLOATS,
    N_INTS,
    NA,
    NOW,
    PERIOD,
    PRE,
    PREEMPTED,
    REJECTED,
    RUN_HEAD,
    RUN_LEN,
    RUNNING,
    STEPS,
    TOTAL,
    TRACE,
    TS_INTERVAL,
    WHOLE,
    EngineArrays,
    N,
    grow_adapters,
    grow_requests,
    new_state,
    pack,
)
from twin.latency import StepCost
from twin.profile import Profile


@njit(cache=True)
def _floats(values) -> np.ndarray:  # noqa: ANN001
    """A typed list as an array (compiled: iterating a typed list from Python is slow)."""
    out = np.empty(len(values))
    for k in range(len(values)):
        out[k] = values[k]
    return out


@njit(cache=True)
def _ints(values) -> np.ndarray:  # noqa: ANN001
    out = np.empty(len(values), dtype=np.int64)
    for k in range(len(values)):
        out[k] = values[k]
    return out


TRACE_FIELDS = ("prefill_tokens", "decode_seqs", "ctx_tokens", "lora_adapters", "loads",
                "admitted", "scanned", "step_ms", "start_s", "finished")
TS_FIELDS = ("t_s", "running", "waiting", "kv_usage", "preemptions")


class EngineCore:
    """One engine's state and its compiled step loop (module docstring)."""

    def __init__(
        self, config: EngineConfig, profile: Profile, adapter_ranks: Sequence[int], *,
        preload_cpu: bool = True, client_max_inflight: int | None = None,
        record_trace: bool = False, timeseries_interval_s: float = 10.0, capacity: int = 64,
    ) -> None:
        kv_tokens = profile.check_feasible(config)
        self.max_len = profile.effective_max_model_len(config)
        self.loads = profile.adapter_loads
        self.max_rank = config.max_lora_rank
        cost, pad = StepCost.for_engine(
            profile.step_model, lora_enabled=config.enable_lora,
            max_lora_rank=config.max_lora_rank, max_loras=config.max_loras,
            scan_us_per_waiting=profile.scheduler.scan_us_per_waiting,
        ).coefficients()
        quirks = profile.scheduler
        bs = config.block_size
        grab = 1 + quirks.kv_preallocate_blocks
        ints = np.zeros(N_INTS, dtype=np.int64)
        ints[[BS, PRE, GRAB, PERIOD]] = bs, quirks.kv_preallocate_blocks, grab, bs * grab
        ints[TOTAL] = ints[FREE] = kv_tokens // bs - 1  # vLLM reserves one null block
        ints[MAXBLK] = -(-self.max_len // bs)
        ints[WHOLE] = int(quirks.admit_only_if_prompt_fits)
        ints[BUDGET_MAX] = config.max_num_batched_tokens
        ints[MAX_SEQS] = config.max_num_seqs
        ints[MAX_LORAS] = config.max_loras if config.enable_lora else 0
        ints[LORA_ON] = int(config.enable_lora)
        ints[GPU_SLOTS] = config.max_loras
        ints[CPU_SLOTS] = config.cpu_slots
        ints[CLIENT_CAP] = -1 if client_max_inflight is None else client_max_inflight
        ints[TRACE] = int(record_trace)
        floats = np.zeros(N_FLOATS)
        floats[TS_INTERVAL] = timeseries_interval_s
        ranks = [int(r) for r in adapter_ranks]
        self.a: EngineArrays = new_state(ints, floats, cost, pad, bs * grab, capacity,
                                        max(len(ranks), 1))
        self.s = pack(self.a)
        for r in ranks:
            self.add_adapter(r)
        if preload_cpu:  # the reference servers pre-register their adapters
            k = min(config.cpu_slots, len(ranks))
            self.a.in_cpu[:k] = 1
            self.a.last_step[:k] = -1
            ints[CPU_N] = k
        self.sched = np.zeros((config.max_num_seqs + 1, 2), dtype=np.int64)
        self.record_trace = record_trace

    # -- requests and adapters ----------------------------------------------------------------
    def resident(self) -> tuple[list[int], list[int]]:
        """Adapter indices in a GPU slot now, and in the CPU cache now."""
        n = int(self.a.I[NA])
        return (np.flatnonzero(self.a.in_gpu[:n]).tolist(),
                np.flatnonzero(self.a.in_cpu[:n]).tolist())

    def add_adapter(self, rank: int) -> int:
        """A new adapter (not in the CPU cache); returns its index."""
        a = int(self.a.I[NA])
        if a >= len(self.a.count):
            self.a = grow_adapters(self.a, 2 * len(self.a.count))
            self.s = pack(self.a)
        self.a.gpu_ms[a] = self.loads.gpu_load_ms(self.max_rank, int(rank))
        self.a.disk_ms[a] = self.loads.disk_load_ms(int(rank))
        self.a.I[NA] = a + 1
        return a

    def _room(self, k: int) -> None:
        n = int(self.a.I[N])
        if n + k > len(self.a.arr):
            self.a = grow_requests(self.a, max(2 * len(self.a.arr), n + k))
            self.s = pack(self.a)

    def _check(self, adapter: np.ndarray) -> None:
        na = int(self.a.I[NA])
        if len(adapter) and (adapter.min() < -1 or adapter.max() >= na):
            raise ValueError(f"adapter: indices must lie in [-1, {na}), got "
                             f"{adapter.min()}..{adapter.max()}")

    def submit(self, arrival_s: float, adapter: int, prompt_len: int, output_len: int) -> int:
        """Add one request (arrivals in order); returns its id. One longer than max_model_len
        is rejected (``status(rid) == REJECTED``) and never served."""
        return self.submit_all(np.array([arrival_s]), np.array([adapter]),
                               np.array([prompt_len]), np.array([output_len]))

    def submit_all(self, arrival_s: np.ndarray, adapter: np.ndarray, prompt_len: np.ndarray,
                   output_len: np.ndarray) -> int:
        """``submit`` for arrival-sorted arrays (a whole workload); returns the first id."""
        arr = np.asarray(arrival_s, dtype=float)
        adp = np.asarray(adapter, dtype=np.int64)
        plen = np.asarray(prompt_len, dtype=np.int64)
        olen = np.asarray(output_len, dtype=np.int64)
        k = len(arr)
        s = self.a
        first = int(s.I[N])
        if k and ((first and arr[0] < s.arr[first - 1]) or np.any(np.diff(arr) < 0)):
            raise ValueError("arrival_s: requests must be submitted in arrival order")
        self._check(adp)
        self._room(k)
        s = self.a
        end = first + k
        s.arr[first:end] = arr
        s.adp[first:end] = adp
        s.plen[first:end] = plen
        s.olen[first:end] = olen
        rejected = plen + olen > self.max_len
        s.state[first:end] = np.where(rejected, REJECTED, 0)
        s.wkey[first:end] = np.arange(first + 1, end + 1)
        s.rej_before[first + 1:end + 1] = s.rej_before[first] + np.cumsum(rejected)
        s.I[N] = end
        waiting.add_all(self.s, first)
        return first

    def abort(self, rid: int) -> None:
        """The client of ``rid`` went away: free what it holds, as vLLM's abort does."""
        s = self.a
        st = int(s.state[rid])
        if st == RUNNING:
            s.I[FREE] += release(self.s, rid)
            s.held[rid] = 0
            leave(self.s, int(s.adp[rid]), int(s.I[STEPS]))
            s.state[rid] = ABORTED
        elif st not in (DONE, REJECTED, DROPPED, ABORTED):
            waiting.abort(self.s, rid)

    # -- the loop -----------------------------------------------------------------------------
    def step(self, until: float) -> float | None:
        """Run the next step if it starts before ``until`` (idle time is skipped, not
        stepped); returns its end time, or None when no step starts before ``until``."""
        end = loop.step(self.s, until, self.sched)
        return None if math.isnan(end) else end

    def advance(self, until: float) -> int:
        """Run every step that starts before ``until``; returns how many ran."""
        return int(loop.advance(self.s, until, self.sched))

    # -- reading it ---------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return float(self.a.F[NOW])

    @property
    def steps(self) -> int:
        return int(self.a.I[STEPS])

    @property
    def last_step_ms(self) -> float:
        return float(self.a.F[LAST_MS])

    @property
    def preemptions(self) -> int:
        return int(self.a.I[PREEMPTED])

    @property
    def disk_loads(self) -> int:
        return int(self.a.I[DISK_LOADS])

    @property
    def collect(self) -> bool:
        return bool(self.a.I[COLLECT])

    @collect.setter
    def collect(self, on: bool) -> None:
        """Keep the last step's first tokens and finishes (``last_first``, ``last_finished``)."""
        self.a.I[COLLECT] = int(on)

    @property
    def last_first(self) -> list[int]:
        return _ints(self.a.last_first).tolist()

    @property
    def last_finished(self) -> list[int]:
        return _ints(self.a.last_fin).tolist()

    def generated(self, rid: int) -> int:
        """Output tokens of ``rid`` so far."""
        return int(generated(self.s, rid))

    def status(self, rid: int) -> int:
        """``rid``'s state (``twin.engine.state``: PENDING, WAITING, RUNNING, DONE, ...)."""
        return int(self.a.state[rid])

    def depth(self) -> tuple[int, int]:
        """(running, waiting) requests now."""
        return int(self.a.I[RUN_LEN]), max(0, int(waiting.waiting(self.s)))

    def requests(self) -> dict[str, np.ndarray]:
        """The request table so far: arrival, adapter, lengths, first token, finish."""
        s, n = self.a, int(self.a.I[N])
        return {"arrival_s": s.arr[:n].copy(), "adapter": s.adp[:n].copy(),
                "prompt_len": s.plen[:n].copy(), "output_len": s.olen[:n].copy(),
                "first_token_s": s.first_t[:n].copy(), "finish_s": s.fin_t[:n].copy()}

    def result(self, duration_s: float, wall_s: float) -> EngineResult:
        """The run's raw outcome so far (requests still decoding report their tokens)."""
        s, n = self.a, int(self.a.I[N])
        gen = s.gen[:n].copy()
        rid = int(s.I[RUN_HEAD])
        while rid >= 0:
            if s.is_dec[rid]:
                gen[rid] += s.I[DC] - s.dc_in[rid]
            rid = int(s.run_next[rid])
        state = s.state[:n]
        ts = _floats(s.ts).reshape(-1, len(TS_FIELDS))
        timeseries = {k: ts[:, i] if k in ("t_s", "kv_usage") else ts[:, i].astype(np.int64)
                      for i, k in enumerate(TS_FIELDS)}
        return EngineResult(
            first_token_s=s.first_t[:n].copy(),
            finish_s=s.fin_t[:n].copy(),
            generated=gen,
            preemptions=s.npre[:n].copy(),
            rejected=state == REJECTED,
            dropped=state == DROPPED,
            itl_gap_ms=_floats(s.itl_gap),
            itl_weight=_ints(s.itl_w),
            preempt_gap_ms=_floats(s.preempt_gaps),
            engine_steps=self.steps,
            simulated_s=min(self.now, duration_s),
            wall_s=wall_s,
            kv_blocks_total=int(s.I[TOTAL]),
            gpu_loads=int(s.I[GPU_LOADS]),
            disk_loads=int(s.I[DISK_LOADS]),
            timeseries=timeseries,
            trace=self._trace() if self.record_trace else None,
        )

    def _trace(self) -> StepTrace:
        rows = _floats(self.a.trace).reshape(-1, len(TRACE_FIELDS))
        cols = {k: (rows[:, i] if k in ("step_ms", "start_s") else
                    rows[:, i].astype(np.int64)).tolist() for i, k in enumerate(TRACE_FIELDS)}
        return StepTrace(**cols)

    def finished(self) -> int:
        return int(self.a.I[FINISHED])

    def running_ids(self) -> list[int]:
        out, rid = [], int(self.a.I[RUN_HEAD])
        while rid >= 0:
            out.append(rid)
            rid = int(self.a.run_next[rid])
        return out
