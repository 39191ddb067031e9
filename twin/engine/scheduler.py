"""One step's scheduling decision, as vLLM V1's ``Scheduler.schedule()`` makes it.

Running requests first: a decode is one token (and, at a block boundary, new KV blocks), an
unfinished prefill gets its next chunk, within ``max_num_batched_tokens``; when blocks run out,
the newest running request is preempted (recompute: its KV is freed and it goes back to the
front of the queue). Then waiting requests, FCFS, up to ``max_num_seqs`` running, none in a step
that preempted; once the step's adapter set holds ``max_loras`` adapters, a waiting request of
another adapter is skipped (the scan goes on, order is preserved).

The step's prefill work is written to ``sched`` (rows of request id, tokens); decoders are
implicit (every running request past its prefill).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from twin.engine import waiting
from twin.engine.kv_blocks import decoder_blocks
from twin.engine.lora_set import enter, leave
from twin.engine.running import add_decoder, admit, release, remove_decoder
from twin.engine.state import (
    BS,
    BUDGET_MAX,
    DC,
    FREE,
    GRAB,
    LORA_ON,
    MAX_LORAS,
    MAX_SEQS,
    MAXBLK,
    N_PREW,
    NACT,
    NDEC,
    NONE,
    PERIOD,
    PF_HEAD,
    PRE,
    PREEMPTED,
    RUN_LEN,
    RUN_TAIL,
    RUNNING,
    WHOLE,
)


@njit(cache=True)
def preempt_tail(s, now: float, step: int) -> int:  # noqa: ANN001
    """Preempt the newest running request (vLLM's FCFS policy); returns its id."""
    rid = s.I[RUN_TAIL]
    s.I[FREE] += release(s, rid)
    s.held[rid] = 0
    s.ncomp[rid] = 0
    s.epoch[rid] += 1
    s.npre[rid] += 1
    s.I[PREEMPTED] += 1
    if s.gen[rid] > 0:
        s.resume_t[rid] = now
    leave(s, s.adp[rid], step)
    waiting.put_back(s, rid)
    return rid


@njit(cache=True)
def decode_blocks(s, now: float, step: int) -> bool:  # noqa: ANN001
    """Give the decoders at a block boundary their new blocks, preempting when the pool runs
    dry; returns whether anything was preempted."""
    ints = s.I
    grab = ints[GRAB]
    slot = ints[DC] % ints[PERIOD]
    ntr = s.due_cnt[slot]
    if ntr == 0:
        return False
    if ints[FREE] >= ntr * grab:
        ints[FREE] -= ntr * grab
        return False
    preempted = False
    if grab == 1:
        # one block each: vLLM walks running in order and preempts from the tail whenever it
        # runs dry; the victims are the shortest tail that frees enough blocks for the members
        # that remain, so take them from the tail directly
        need = ntr
        while ints[FREE] < need:
            if s.due_ph[ints[RUN_TAIL]] == slot:
                need -= 1
            preempt_tail(s, now, step)
            preempted = True
        ints[FREE] -= need
        return preempted
    # with preallocation a member may get fewer blocks than it asks: walk in running order
    members = np.empty(ntr, dtype=np.int64)
    rid = s.due_head[slot]
    for k in range(ntr):
        members[k] = rid
        rid = s.due_next[rid]
    members = members[np.argsort(s.pos[members])]
    for rid in members:
        if s.state[rid] != RUNNING or not s.is_dec[rid]:
            continue
        while ints[FREE] < 1 and s.state[rid] == RUNNING:
            preempt_tail(s, now, step)
            preempted = True
        if s.state[rid] != RUNNING:
            break
        got = min(grab, ints[FREE], ints[MAXBLK] - decoder_blocks(s, rid, ints[DC]))
        ints[FREE] -= got
        if got < grab:
            # re-register with the blocks it really holds (clock arithmetic changes);
            # add_decoder puts it at the same clock: it already holds this step's block
            blocks = remove_decoder(s, rid) + got
            s.epoch[rid] += 1
            add_decoder(s, rid, blocks)
    return preempted


@njit(cache=True)
def prefill_chunks(s, budget: int, sched, n: int, now: float, step: int):  # noqa: ANN001, ANN201
    """Next chunks of running prefills within ``budget``; returns (budget left, rows of
    ``sched``, preempted)."""
    ints = s.I
    bs, pre = ints[BS], ints[PRE]
    preempted = False
    rid = ints[PF_HEAD]
    while rid != NONE:
        if budget <= 0 or s.state[rid] != RUNNING:
            break
        chunk = min(s.plen[rid] + s.gen[rid] - s.ncomp[rid], budget)
        need = -(-(s.ncomp[rid] + chunk) // bs) - s.held[rid]
        while need > 0 and ints[FREE] < need and s.state[rid] == RUNNING:
            preempt_tail(s, now, step)
            preempted = True
        if s.state[rid] != RUNNING:
            break
        if need > 0:
            got = min(need + pre, ints[FREE], ints[MAXBLK] - s.held[rid])
            s.held[rid] += got
            ints[FREE] -= got
        sched[n, 0] = rid
        sched[n, 1] = chunk
        n += 1
        budget -= chunk
        rid = s.pf_next[rid]  # (a preempted tail is unlinked: the snapshot would stop there)
    return budget, n, preempted


@njit(cache=True)
def admit_waiting(s, budget: int, nwait: int, sched, n: int, now: float):  # noqa: ANN001, ANN201
    """Admit waiting requests within ``budget``; returns (admitted, waiting requests vLLM's
    loop examined, rows of ``sched``). The loop walks the queue in order, skipping other
    adapters' requests while the set is full, until the budget or max_num_seqs runs out
    (examined: up to the last admitted request), an allocation fails (up to that request) or
    the queue ends (all of it)."""
    ints = s.I
    bs, pre = ints[BS], ints[PRE]
    nwait0, npre0 = nwait, ints[N_PREW]
    scanned = nwait0
    stop_rid = -1
    admitted = 0
    max_seqs, max_loras, lora_on = ints[MAX_SEQS], ints[MAX_LORAS], ints[LORA_ON]
    while True:
        if budget <= 0 or ints[RUN_LEN] >= max_seqs:
            scanned = -1  # stopped after the last admitted request
            break
        if not nwait:
            break
        rid = waiting.first_in_set(s) if lora_on and ints[NACT] >= max_loras else waiting.first(s)
        if rid < 0 or s.arr[rid] > now:
            break
        need_total = s.plen[rid] + s.gen[rid]
        chunk = min(need_total, budget)
        must_fit = -(-need_total // bs) if ints[WHOLE] else -(-chunk // bs)
        if ints[FREE] < must_fit:
            stop_rid = rid
            scanned = -1
            break
        got = min(-(-chunk // bs) + pre, ints[FREE], ints[MAXBLK])
        ints[FREE] -= got
        s.held[rid] = got
        s.ncomp[rid] = 0
        waiting.take(s, rid)
        nwait -= 1
        a = s.adp[rid]
        enter(s, a)
        waiting.push_head(s, a)
        admit(s, rid)
        sched[n, 0] = rid
        sched[n, 1] = chunk
        n += 1
        budget -= chunk
        admitted += 1
        stop_rid = rid
    if scanned < 0:
        scanned = waiting.position(s, stop_rid, nwait0, npre0, admitted)
    return admitted, scanned, n


@njit(cache=True)
def schedule(s, now: float, nwait: int, step: int, sched):  # noqa: ANN001, ANN201
    """The step's batch into ``sched``; returns (its rows, requests admitted from the queue,
    waiting requests examined)."""
    ints = s.I
    preempted = decode_blocks(s, now, step)
    budget = ints[BUDGET_MAX] - ints[NDEC]
    n = 0
    if ints[PF_HEAD] != NONE and budget > 0:
        budget, n, p = prefill_chunks(s, budget, sched, n, now, step)
        preempted = preempted or p
    admitted = scanned = 0
    if not preempted and budget > 0 and ints[RUN_LEN] < ints[MAX_SEQS]:
        admitted, scanned, n = admit_waiting(s, budget, nwait, sched, n, now)
    return n, admitted, scanned
