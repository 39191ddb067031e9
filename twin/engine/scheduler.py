"""One step's scheduling decision, as vLLM V1's ``Scheduler.schedule()`` makes it.

Running requests first: a decode is one token (and, at a block boundary, new KV blocks), an
unfinished prefill gets its next chunk, within ``max_num_batched_tokens``; when blocks run out,
the newest running request is preempted (recompute: its KV is freed and it goes back to the
front of the queue). Then waiting requests, FCFS, up to ``max_num_seqs`` running, none in a step
that preempted; once the step's adapter set holds ``max_loras`` adapters, a waiting request of
another adapter is skipped (the scan goes on, order is preserved).
"""

from __future__ import annotations

from dataclasses import dataclass

from twin.engine.kv_blocks import KVBlocks
from twin.engine.lora_set import LoraSet
from twin.engine.running import RunningSet
from twin.engine.table import RUNNING, RequestTable
from twin.engine.waiting import WaitingQueue


@dataclass(frozen=True)
class SchedulerLimits:
    """The engine arguments the scheduler obeys."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_loras: int  # 0 when LoRA is off
    lora_on: bool


class Scheduler:
    """Decides each step's batch; mutates the running set, the queue and the KV pool."""

    __slots__ = ("t", "kv", "run", "lora", "queue", "limits", "preempted_total")

    def __init__(self, table: RequestTable, kv: KVBlocks, running: RunningSet, lora: LoraSet,
                 queue: WaitingQueue, limits: SchedulerLimits) -> None:
        self.t = table
        self.kv = kv
        self.run = running
        self.lora = lora
        self.queue = queue
        self.limits = limits
        self.preempted_total = 0

    def preempt_tail(self, now: float, step: int) -> int:
        """Preempt the newest running request (vLLM's FCFS policy); returns its id."""
        t, run = self.t, self.run
        rid = next(reversed(run.order))
        self.kv.free += run.release(rid)
        t.held[rid] = 0
        t.ncomp[rid] = 0
        t.epoch[rid] += 1
        t.npre[rid] += 1
        self.preempted_total += 1
        if t.gen[rid] > 0:
            t.resume_t[rid] = now
        self.lora.leave(t.adp[rid], step)
        self.queue.put_back(rid)
        return rid

    def decode_blocks(self, now: float, step: int) -> bool:
        """Give the decoders at a block boundary their new blocks, preempting when the pool runs
        dry; returns whether anything was preempted."""
        kv, run, t = self.kv, self.run, self.t
        grab = kv.grab
        members = kv.due[run.dc % kv.period]
        ntr = len(members)
        if not ntr:
            return False
        if kv.free >= ntr * grab:
            kv.free -= ntr * grab
            return False
        preempted = False
        if grab == 1:
            # one block each: vLLM walks running in order and preempts from the tail whenever
            # it runs dry; the victims are the shortest tail that frees enough blocks for the
            # members that remain, so take them from the tail directly
            need = ntr
            while kv.free < need:
                if next(reversed(run.order)) in members:
                    need -= 1
                self.preempt_tail(now, step)
                preempted = True
            kv.free -= need
            return preempted
        # with preallocation a member may get fewer blocks than it asks: walk in order
        for rid in sorted(members, key=t.pos.__getitem__):
            if t.state[rid] != RUNNING or not t.is_dec[rid]:
                continue
            while kv.free < 1 and t.state[rid] == RUNNING:
                self.preempt_tail(now, step)
                preempted = True
            if t.state[rid] != RUNNING:
                break
            got = min(grab, kv.free, kv.max_blocks_req - kv.decoder_blocks(rid, run.dc))
            kv.free -= got
            if got < grab:
                # re-register with the blocks it really holds (clock arithmetic changes);
                # add_decoder puts it at the same clock: it already holds this step's block
                blocks = run.remove_decoder(rid) + got
                t.epoch[rid] += 1
                run.add_decoder(rid, blocks)
        return preempted

    def prefill_chunks(self, budget: int, sched: list[tuple[int, int]], now: float,
                       step: int) -> tuple[int, bool]:
        """Next chunks of running prefills within ``budget``; returns (budget left,
        preempted)."""
        t, kv, run = self.t, self.kv, self.run
        bs, pre = kv.block_size, kv.pre
        preempted = False
        for rid in list(run.prefilling):
            if budget <= 0 or t.state[rid] != RUNNING:
                break
            chunk = min(t.plen[rid] + t.gen[rid] - t.ncomp[rid], budget)
            need = -(-(t.ncomp[rid] + chunk) // bs) - t.held[rid]
            while need > 0 and kv.free < need and t.state[rid] == RUNNING:
                self.preempt_tail(now, step)
                preempted = True
            if t.state[rid] != RUNNING:
                break
            if need > 0:
                got = min(need + pre, kv.free, kv.max_blocks_req - t.held[rid])
                t.held[rid] += got
                kv.free -= got
            sched.append((rid, chunk))
            budget -= chunk
        return budget, preempted

    def admit_waiting(self, budget: int, nwait: int, sched: list[tuple[int, int]],
                      now: float) -> tuple[int, int]:
        """Admit waiting requests within ``budget``; returns (admitted, waiting requests
        vLLM's loop examined). The loop walks the queue in order, skipping other adapters'
        requests while the set is full, until the budget or max_num_seqs runs out (examined:
        up to the last admitted request), an allocation fails (up to that request) or the
        queue ends (all of it)."""
        t, kv, run, lora, queue, lim = self.t, self.kv, self.run, self.lora, self.queue, \
            self.limits
        arr, plen, gen = t.arr, t.plen, t.gen
        bs, pre = kv.block_size, kv.pre
        nwait0, npre0 = nwait, queue.n_pre_waiting
        scanned = nwait0
        stop_rid = -1
        admitted = 0
        max_seqs, max_loras, lora_on = lim.max_num_seqs, lim.max_loras, lim.lora_on
        while True:
            if budget <= 0 or len(run.order) >= max_seqs:
                scanned = -1  # stopped after the last admitted request
                break
            if not nwait:
                break
            rid = queue.first_in_set() if lora_on and lora.n >= max_loras else queue.first()
            if rid < 0 or arr[rid] > now:
                break
            need_total = plen[rid] + gen[rid]
            chunk = min(need_total, budget)
            must_fit = -(-need_total // bs) if kv.whole_prompt else -(-chunk // bs)
            if kv.free < must_fit:
                stop_rid = rid
                scanned = -1
                break
            got = min(-(-chunk // bs) + pre, kv.free, kv.max_blocks_req)
            kv.free -= got
            t.held[rid] = got
            t.ncomp[rid] = 0
            queue.take(rid)
            nwait -= 1
            a = t.adp[rid]
            lora.enter(a)
            queue.push_head(a)
            run.admit(rid)
            sched.append((rid, chunk))
            budget -= chunk
            admitted += 1
            stop_rid = rid
        if scanned < 0:
            scanned = queue.position(stop_rid, nwait0, npre0, admitted)
        return admitted, scanned

    def schedule(self, now: float, nwait: int, step: int) -> tuple[list[tuple[int, int]], int,
                                                                   int]:
        """The step's batch: ``[(rid, prefill tokens)]`` (decoders are implicit), the requests
        admitted from the queue, and the waiting requests examined."""
        preempted = self.decode_blocks(now, step)
        budget = self.limits.max_num_batched_tokens - self.run.ndec
        sched: list[tuple[int, int]] = []
        if self.run.prefilling and budget > 0:
            budget, p = self.prefill_chunks(budget, sched, now, step)
            preempted = preempted or p
        admitted = scanned = 0
        if not preempted and budget > 0 and len(self.run.order) < self.limits.max_num_seqs:
            admitted, scanned = self.admit_waiting(budget, nwait, sched, now)
        return sched, admitted, scanned

