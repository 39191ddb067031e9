"""The running requests: running order, the prefill-phase subset and the decoders' aggregates.

Decoders advance together on one decode clock ``DC`` (one token per step each), so none is
touched per step: a decoder stores the clock at which it entered decode; its token count, its
blocks and its finishing clock follow from it (finishing clocks are a heap). The step's context
is ``S_NB + NDEC * (DC + 1)``. The running order and the prefilling subset are linked lists
through the request table (admitted at the tail, preempted from the tail, finished anywhere).
"""

from __future__ import annotations

from numba import njit

from twin.engine.heaps import heap_push
from twin.engine.kv_blocks import decoder_blocks, due_add, due_remove
from twin.engine.links import append, unlink
from twin.engine.state import (
    BS,
    DC,
    FIN_N,
    NDEC,
    PERIOD,
    PF_HEAD,
    PF_TAIL,
    POS_CTR,
    RUN_HEAD,
    RUN_LEN,
    RUN_TAIL,
    S_NB,
)


@njit(cache=True)
def admit(s, rid: int) -> None:  # noqa: ANN001
    """A waiting request starts running (at the tail, in prefill)."""
    s.I[POS_CTR] += 1
    s.pos[rid] = s.I[POS_CTR]
    append(s.run_prev, s.run_next, s.I, RUN_HEAD, RUN_TAIL, rid)
    s.I[RUN_LEN] += 1
    append(s.pf_prev, s.pf_next, s.I, PF_HEAD, PF_TAIL, rid)


@njit(cache=True)
def leave_prefill(s, rid: int) -> None:  # noqa: ANN001
    unlink(s.pf_prev, s.pf_next, s.I, PF_HEAD, PF_TAIL, rid)


@njit(cache=True)
def leave_running(s, rid: int) -> None:  # noqa: ANN001
    unlink(s.run_prev, s.run_next, s.I, RUN_HEAD, RUN_TAIL, rid)
    s.I[RUN_LEN] -= 1


@njit(cache=True)
def add_decoder(s, rid: int, h: int) -> None:  # noqa: ANN001
    """Register a request that will decode from clock ``DC`` on, holding ``h`` blocks."""
    ints = s.I
    dc = ints[DC]
    s.is_dec[rid] = 1
    ints[NDEC] += 1
    nc = s.plen[rid] + s.gen[rid] - 1
    ints[S_NB] += nc - dc
    s.dc_in[rid] = dc
    s.held[rid] = h
    t0 = dc + h * ints[BS] - nc
    s.trig0[rid] = t0
    due_add(s, rid, t0 % ints[PERIOD])
    ints[FIN_N] = heap_push(s.fin, ints[FIN_N], dc + s.olen[rid] - s.gen[rid], rid, s.epoch[rid])


@njit(cache=True)
def remove_decoder(s, rid: int) -> int:  # noqa: ANN001
    """Detach a decoder from the aggregates (its tokens so far become ``gen``); returns its
    KV blocks."""
    ints = s.I
    dc = ints[DC]
    s.is_dec[rid] = 0
    ints[NDEC] -= 1
    ints[S_NB] -= s.plen[rid] + s.gen[rid] - 1 - s.dc_in[rid]
    due_remove(s, rid)
    s.gen[rid] += dc - s.dc_in[rid]
    return decoder_blocks(s, rid, dc)


@njit(cache=True)
def release(s, rid: int) -> int:  # noqa: ANN001
    """Take ``rid`` out of the running set; returns the KV blocks it held."""
    leave_running(s, rid)
    if s.is_dec[rid]:
        return remove_decoder(s, rid)
    leave_prefill(s, rid)
    return s.held[rid]


@njit(cache=True)
def generated(s, rid: int) -> int:  # noqa: ANN001
    """Output tokens of ``rid`` so far."""
    if s.is_dec[rid]:
        return s.gen[rid] + s.I[DC] - s.dc_in[rid]
    return s.gen[rid]
