"""The engine core: one vLLM V1 engine serving LoRA adapters, advanced step by step.

``EngineCore`` is steppable: requests are ``submit``-ted as they arrive (or a whole workload at
once), ``step(until)`` runs the next step that starts before ``until`` — schedule, predicted
step time (``twin.latency.StepCost``), update from its output — and returns when it ends;
``advance(until)`` runs every such step. The offline twin (``run_engine``) and the live ``sim``
backend drive this same object, one in simulated time, the other in real time.

Speed: a step's work is O(changes), never O(batch): decoders are not touched per step (see
``running``), nor are waiting requests (see ``waiting``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from twin.adapters import AdapterCaches
from twin.config import EngineConfig
from twin.engine.kv_blocks import KVBlocks
from twin.engine.lora_set import LoraSet
from twin.engine.result import EngineResult, StepTrace, Timeseries
from twin.engine.running import RunningSet
from twin.engine.scheduler import Scheduler, SchedulerLimits
from twin.engine.table import ABORTED, DONE, DROPPED, REJECTED, RUNNING, RequestTable
from twin.engine.waiting import WaitingQueue
from twin.latency import StepCost
from twin.profile import Profile


class EngineCore:
    """One engine's state and its step loop (module docstring)."""

    def __init__(
        self, config: EngineConfig, profile: Profile, adapter_ranks: Sequence[int], *,
        preload_cpu: bool = True, client_max_inflight: int | None = None,
        record_trace: bool = False, timeseries_interval_s: float = 10.0,
    ) -> None:
        kv_tokens = profile.check_feasible(config)
        self.max_len = profile.effective_max_model_len(config)
        self.step_ms = StepCost.for_engine(
            profile.step_model, lora_enabled=config.enable_lora,
            max_lora_rank=config.max_lora_rank, max_loras=config.max_loras,
            scan_us_per_waiting=profile.scheduler.scan_us_per_waiting,
        ).ms
        self.table = t = RequestTable()
        self.kv = KVBlocks(kv_tokens, config.block_size, profile.scheduler.kv_preallocate_blocks,
                           self.max_len, profile.scheduler.admit_only_if_prompt_fits, t)
        self.running = RunningSet(t, self.kv)
        ranks = [int(r) for r in adapter_ranks]
        self.loads = loads = profile.adapter_loads
        self.max_rank = config.max_lora_rank
        cpu_slots = config.cpu_slots
        self.lora = LoraSet(AdapterCaches(
            config.max_loras, cpu_slots,
            [loads.gpu_load_ms(config.max_lora_rank, r) for r in ranks],
            [loads.disk_load_ms(r) for r in ranks],
            preloaded=range(min(cpu_slots, len(ranks))) if preload_cpu else (),
        ))
        self.queue = WaitingQueue(t, self.lora, client_max_inflight)
        self.scheduler = Scheduler(t, self.kv, self.running, self.lora, self.queue,
                                   SchedulerLimits(config.max_num_batched_tokens,
                                                   config.max_num_seqs,
                                                   config.max_loras if config.enable_lora else 0,
                                                   config.enable_lora))
        self.now = 0.0  # simulated time: the end of the last step (or an idle jump)
        self.steps = 0
        self.finished = 0
        self.itl_gap: list[float] = []  # distinct decode-step durations ...
        self.itl_w: list[int] = []  # ... and how many decode tokens each produced
        self.preempt_gaps: list[float] = []
        self.series = Timeseries(timeseries_interval_s)
        self.trace = StepTrace() if record_trace else None
        self.last_step_ms = 0.0
        self.collect = False  # keep the last step's first tokens and finishes (live use)
        self.last_first: list[int] = []
        self.last_finished: list[int] = []

    # -- requests -----------------------------------------------------------------------------
    def submit(self, arrival_s: float, adapter: int, prompt_len: int, output_len: int) -> int:
        """Add one request (arrivals in order); returns its id. One longer than max_model_len
        is rejected (``rejected(rid)``) and never served."""
        rid = self.table.append(float(arrival_s), int(adapter), int(prompt_len),
                                int(output_len), self.max_len)
        self.queue.add_one(rid)
        return rid

    def submit_all(self, arrival_s: np.ndarray, adapter: np.ndarray, prompt_len: np.ndarray,
                   output_len: np.ndarray) -> None:
        """``submit`` for arrival-sorted arrays (a whole workload)."""
        first = len(self.table)
        self.table.extend(arrival_s, adapter, prompt_len, output_len, self.max_len)
        self.queue.added(first)

    def abort(self, rid: int) -> None:
        """The client of ``rid`` went away: free what it holds, as vLLM's abort does."""
        t = self.table
        st = t.state[rid]
        if st == RUNNING:
            self.kv.free += self.running.release(rid)
            t.held[rid] = 0
            self.lora.leave(t.adp[rid], self.steps)
            t.state[rid] = ABORTED
        elif st not in (DONE, REJECTED, DROPPED, ABORTED):
            self.queue.abort(rid)

    def add_adapter(self, rank: int) -> int:
        """A new adapter (not in the CPU cache yet); returns its index."""
        caches = self.lora.caches
        caches.gpu_ms.append(self.loads.gpu_load_ms(self.max_rank, int(rank)))
        caches.disk_ms.append(self.loads.disk_load_ms(int(rank)))
        return len(caches.gpu_ms) - 1

    def generated(self, rid: int) -> int:
        """Output tokens of ``rid`` so far."""
        return self.running.generated(rid)

    def status(self, rid: int) -> int:
        """``rid``'s state (``twin.engine.table``: PENDING, WAITING, RUNNING, DONE, ...)."""
        return self.table.state[rid]

    def depth(self) -> tuple[int, int]:
        """(running, waiting) requests now."""
        q = self.queue
        waiting = (q.ai - self.table.rejected_before[q.ai] - q.n_dropped - q.n_fresh_admitted
                   + q.n_pre_waiting)
        return len(self.running.order), max(0, waiting)

    # -- the loop -----------------------------------------------------------------------------
    def advance(self, until: float) -> int:
        """Run every step that starts before ``until``; returns how many ran."""
        n = 0
        step = self.step
        while step(until) is not None:
            n += 1
        return n

    def step(self, until: float) -> float | None:
        """Run the next step if it starts before ``until`` (idle time is skipped, not stepped);
        returns its end time, or None when no step starts before ``until``."""
        t = self.table
        run, queue, lora = self.running, self.queue, self.lora
        while True:
            now = self.now
            nwait = queue.arrive(now, len(run.order))
            if not run.order and nwait == 0:
                j = queue.next_arrival()
                if j < 0 or t.arr[j] >= until:
                    return None
                self.now = t.arr[j]
                continue
            if now >= until:
                return None
            self.series.sample(now, len(run.order), nwait, self.kv.usage(),
                               self.scheduler.preempted_total)
            fin_before = self.finished
            sched, admitted, scanned = self.scheduler.schedule(now, nwait, self.steps)
            load_ms, loads_here = lora.settle_loads(self.steps)
            p_tok = 0
            k_ctx = run.s_nb + run.ndec * (run.dc + 1)
            ncomp = t.ncomp
            for rid, chunk in sched:
                p_tok += chunk
                k_ctx += ncomp[rid] + chunk
            if p_tok == 0 and run.ndec == 0:
                if run.order:
                    raise RuntimeError("engine scheduled nothing while requests were running")
                if queue.ai >= len(t):
                    return None
                self.now = max(now, t.arr[queue.ai])
                continue
            break
        dt_ms = self.step_ms(p_tok, run.ndec, k_ctx, lora.n, load_ms, scanned - admitted)
        if self.trace is not None:
            self.trace.record(p_tok, run.ndec, k_ctx, lora.n, loads_here, admitted, scanned,
                              dt_ms, now)
        end = now + dt_ms / 1e3
        self.now = end
        self.last_step_ms = dt_ms
        self.steps += 1
        if run.ndec:
            self.itl_gap.append(dt_ms)
            self.itl_w.append(run.ndec)
        run.dc += 1
        self._update(sched, end)
        if self.trace is not None:
            self.trace.finished.append(self.finished - fin_before)
        return end

    def _update(self, sched: list[tuple[int, int]], now: float) -> None:
        """The step's output: prefill progress, first tokens, finishes."""
        t, run, kv, lora = self.table, self.running, self.kv, self.lora
        collect = self.collect
        if collect:
            self.last_first = []
            self.last_finished = []
        plen, gen, olen, ncomp, first_t = t.plen, t.gen, t.olen, t.ncomp, t.first_t
        for rid, chunk in sched:
            nc = ncomp[rid] + chunk
            ncomp[rid] = nc
            if nc < plen[rid] + gen[rid]:
                continue
            run.prefilling.remove(rid)
            g = gen[rid] + 1
            gen[rid] = g
            if first_t[rid] != first_t[rid]:  # nan: first token of this request
                first_t[rid] = now
                if collect:
                    self.last_first.append(rid)
            elif t.resume_t[rid] == t.resume_t[rid]:
                self.preempt_gaps.append((now - t.resume_t[rid]) * 1e3)
                t.resume_t[rid] = math.nan
            if g >= olen[rid]:
                self._finish(rid, now)
                del run.order[rid]
                kv.free += t.held[rid]
                lora.leave(t.adp[rid], self.steps)
            else:
                run.add_decoder(rid, t.held[rid])
        for rid, ep in run.fin_at.pop(run.dc, ()):
            if ep != t.epoch[rid] or t.state[rid] != RUNNING or not t.is_dec[rid]:
                continue
            kv.free += run.remove_decoder(rid)
            self._finish(rid, now)
            del run.order[rid]
            lora.leave(t.adp[rid], self.steps)

    def _finish(self, rid: int, now: float) -> None:
        self.finished += 1
        self.table.state[rid] = DONE
        self.table.fin_t[rid] = now
        if self.collect:
            self.last_finished.append(rid)

    def result(self, duration_s: float, wall_s: float) -> EngineResult:
        """The run's raw outcome so far (requests still decoding report their tokens)."""
        t, run = self.table, self.running
        gen = list(t.gen)
        for rid in run.order:
            if t.is_dec[rid]:
                gen[rid] += run.dc - t.dc_in[rid]
        state = np.frombuffer(bytes(t.state), dtype=np.uint8)
        caches = self.lora.caches
        return EngineResult(
            first_token_s=np.asarray(t.first_t, dtype=float),
            finish_s=np.asarray(t.fin_t, dtype=float),
            generated=np.asarray(gen, dtype=np.int64),
            preemptions=np.asarray(t.npre, dtype=np.int64),
            rejected=state == REJECTED,
            dropped=state == DROPPED,
            itl_gap_ms=np.asarray(self.itl_gap, dtype=float),
            itl_weight=np.asarray(self.itl_w, dtype=np.int64),
            preempt_gap_ms=np.asarray(self.preempt_gaps, dtype=float),
            engine_steps=self.steps,
            simulated_s=min(self.now, duration_s),
            wall_s=wall_s,
            kv_blocks_total=self.kv.total,
            gpu_loads=caches.gpu_loads,
            disk_loads=caches.disk_loads,
            timeseries=self.series.arrays(),
            trace=self.trace,
        )
