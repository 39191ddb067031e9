"""Paged KV: the free-block pool and the decoders' block arithmetic (vLLM's KVCacheManager).

Blocks hold ``block_size`` tokens, one is reserved as vLLM's null block, and a request takes its
blocks on demand plus the version's preallocation (``kv_preallocate_blocks``; not capped at
max_model_len, which over-counts at most that many blocks for a request ending within them of
it). A decoding request needs ``1 + preallocation`` new blocks every ``block_size * (1 +
preallocation)`` decode steps; decoders are threaded into one list per phase of that period
(``due_*``), so the number that need a block in a step is one list's length, not a walk over
the batch. The pool's sizes live in the state's scalars (``FREE``, ``TOTAL``, ``BS``, ``PRE``,
``GRAB``, ``PERIOD``, ``MAXBLK``, ``WHOLE``).
"""

from __future__ import annotations

from numba import njit

from twin.engine.links import push_front, remove
from twin.engine.state import GRAB, NONE, PERIOD


@njit(cache=True)
def decoder_blocks(s, rid: int, clock: int) -> int:  # noqa: ANN001
    """Blocks a decoder holds at decode clock ``clock``."""
    t0 = s.trig0[rid]
    if clock <= t0:
        return s.held[rid]
    grab = s.I[GRAB]
    return s.held[rid] + grab * ((clock - t0 - 1) // s.I[PERIOD] + 1)


@njit(cache=True)
def due_add(s, rid: int, phase: int) -> None:  # noqa: ANN001
    """``rid`` needs blocks at the decode clocks of ``phase`` (mod the period)."""
    push_front(s.due_prev, s.due_next, s.due_head, phase, rid)
    s.due_ph[rid] = phase
    s.due_cnt[phase] += 1


@njit(cache=True)
def due_remove(s, rid: int) -> None:  # noqa: ANN001
    phase = s.due_ph[rid]
    if phase == NONE:
        return
    remove(s.due_prev, s.due_next, s.due_head, phase, rid)
    s.due_ph[rid] = NONE
    s.due_cnt[phase] -= 1
