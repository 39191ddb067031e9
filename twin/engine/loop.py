"""The engine's step loop, compiled: arrivals, ``schedule()``, the step time, the update.

``step`` runs the next step that starts before ``until`` (idle time is skipped to the next
arrival, not stepped) and returns its end time (NaN when no step starts before ``until``);
``advance`` runs every such step.
"""

from __future__ import annotations

import math

from numba import njit

from twin.engine import waiting
from twin.engine.heaps import heap_pop
from twin.engine.lora_set import leave, settle_loads
from twin.engine.running import add_decoder, leave_prefill, leave_running, remove_decoder
from twin.engine.scheduler import schedule
from twin.engine.state import (
    AI,
    COLLECT,
    DC,
    DONE,
    FIN_N,
    FINISHED,
    FREE,
    LAST_MS,
    NACT,
    NDEC,
    NEXT_TS,
    NOW,
    PREEMPTED,
    RUN_LEN,
    RUNNING,
    S_NB,
    STEPS,
    TOTAL,
    TRACE,
    TS_INTERVAL,
    N,
)
from twin.engine.step_time import step_ms


@njit(cache=True)
def _sample(s, now: float, running: int, nwait: int) -> None:  # noqa: ANN001
    """Running, waiting, KV usage and preemptions at the first step of each interval."""
    if now >= s.F[NEXT_TS]:
        ts = s.ts
        ts.append(now)
        ts.append(float(running))
        ts.append(float(nwait))
        ts.append(1.0 - s.I[FREE] / s.I[TOTAL])
        ts.append(float(s.I[PREEMPTED]))
        s.F[NEXT_TS] += s.F[TS_INTERVAL]


@njit(cache=True)
def _finish(s, rid: int, now: float) -> None:  # noqa: ANN001
    s.I[FINISHED] += 1
    s.state[rid] = DONE
    s.fin_t[rid] = now
    if s.I[COLLECT]:
        s.last_fin.append(rid)


@njit(cache=True)
def _update(s, sched, n: int, now: float) -> None:  # noqa: ANN001
    """The step's output: prefill progress, first tokens, finishes."""
    ints = s.I
    step = ints[STEPS]
    for k in range(n):
        rid, chunk = sched[k, 0], sched[k, 1]
        nc = s.ncomp[rid] + chunk
        s.ncomp[rid] = nc
        if nc < s.plen[rid] + s.gen[rid]:
            continue
        leave_prefill(s, rid)
        g = s.gen[rid] + 1
        s.gen[rid] = g
        if math.isnan(s.first_t[rid]):  # first token of this request
            s.first_t[rid] = now
            if ints[COLLECT]:
                s.last_first.append(rid)
        elif not math.isnan(s.resume_t[rid]):
            s.preempt_gaps.append((now - s.resume_t[rid]) * 1e3)
            s.resume_t[rid] = math.nan
        if g >= s.olen[rid]:
            _finish(s, rid, now)
            leave_running(s, rid)
            ints[FREE] += s.held[rid]
            leave(s, s.adp[rid], step)
        else:
            add_decoder(s, rid, s.held[rid])
    dc = ints[DC]
    while ints[FIN_N]:
        buf = s.fin[0]
        if buf[0, 0] != dc:
            break
        rid, ep = buf[0, 1], buf[0, 2]
        ints[FIN_N] = heap_pop(s.fin, ints[FIN_N])
        if ep != s.epoch[rid] or s.state[rid] != RUNNING or not s.is_dec[rid]:
            continue
        ints[FREE] += remove_decoder(s, rid)
        _finish(s, rid, now)
        leave_running(s, rid)
        leave(s, s.adp[rid], step)


@njit(cache=True)
def step(s, until: float, sched) -> float:  # noqa: ANN001
    """Run the next step if it starts before ``until``; its end time, or NaN."""
    ints, fl = s.I, s.F
    while True:
        now = fl[NOW]
        nwait = waiting.arrive(s, now, ints[RUN_LEN])
        if ints[RUN_LEN] == 0 and nwait == 0:
            j = waiting.next_arrival(s)
            if j < 0 or s.arr[j] >= until:
                return math.nan
            fl[NOW] = s.arr[j]
            continue
        if now >= until:
            return math.nan
        _sample(s, now, ints[RUN_LEN], nwait)
        fin_before = ints[FINISHED]
        n, admitted, scanned = schedule(s, now, nwait, ints[STEPS], sched)
        load_ms, loads_here = settle_loads(s, ints[STEPS])
        p_tok = 0
        k_ctx = ints[S_NB] + ints[NDEC] * (ints[DC] + 1)
        for k in range(n):
            p_tok += sched[k, 1]
            k_ctx += s.ncomp[sched[k, 0]] + sched[k, 1]
        if p_tok == 0 and ints[NDEC] == 0:
            if ints[RUN_LEN]:
                raise RuntimeError("engine scheduled nothing while requests were running")
            if ints[AI] >= ints[N]:
                return math.nan
            fl[NOW] = max(now, s.arr[ints[AI]])
            continue
        break
    if ints[COLLECT]:
        s.last_first.clear()
        s.last_fin.clear()
    dt_ms = step_ms(s.cost, s.pad, p_tok, ints[NDEC], k_ctx, ints[NACT], load_ms,
                    scanned - admitted)
    if ints[TRACE]:
        tr = s.trace
        tr.append(float(p_tok))
        tr.append(float(ints[NDEC]))
        tr.append(float(k_ctx))
        tr.append(float(ints[NACT]))
        tr.append(float(loads_here))
        tr.append(float(admitted))
        tr.append(float(scanned))
        tr.append(dt_ms)
        tr.append(now)
    end = now + dt_ms / 1e3
    fl[NOW] = end
    fl[LAST_MS] = dt_ms
    ints[STEPS] += 1
    if ints[NDEC]:  # consecutive decode steps of equal duration share one entry
        last = len(s.itl_gap) - 1
        if last >= 0 and s.itl_gap[last] == dt_ms:
            s.itl_w[last] += ints[NDEC]
        else:
            s.itl_gap.append(dt_ms)
            s.itl_w.append(ints[NDEC])
    ints[DC] += 1
    _update(s, sched, n, end)
    if ints[TRACE]:
        s.trace.append(float(ints[FINISHED] - fin_before))
    return end


@njit(cache=True)
def advance(s, until: float, sched) -> int:  # noqa: ANN001
    """Run every step that starts before ``until``; returns how many ran."""
    n = 0
    while not math.isnan(step(s, until, sched)):
        n += 1
    return n
