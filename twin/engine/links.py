"""Doubly linked lists threaded through the request table's columns (compiled).

Two kinds: a list whose head and tail are scalars of the state (the running order, the
prefilling subset: admitted at the tail, removed anywhere), and a family of lists whose heads
sit in an array indexed by a key (the decoders of each block phase, each adapter's preempted
requests: pushed at the front, removed anywhere). ``NONE`` (-1) ends a list."""

from __future__ import annotations

from numba import njit

NONE = -1


@njit(cache=True)
def append(prev, nxt, ints, head: int, tail: int, rid: int) -> None:  # noqa: ANN001
    """``rid`` at the tail of the list whose ends are ``ints[head]``, ``ints[tail]``."""
    last = ints[tail]
    prev[rid] = last
    nxt[rid] = NONE
    if last == NONE:
        ints[head] = rid
    else:
        nxt[last] = rid
    ints[tail] = rid


@njit(cache=True)
def unlink(prev, nxt, ints, head: int, tail: int, rid: int) -> None:  # noqa: ANN001
    """``rid`` out of the list whose ends are ``ints[head]``, ``ints[tail]``."""
    p, n = prev[rid], nxt[rid]
    if p == NONE:
        ints[head] = n
    else:
        nxt[p] = n
    if n == NONE:
        ints[tail] = p
    else:
        prev[n] = p


@njit(cache=True)
def push_front(prev, nxt, heads, key: int, rid: int) -> None:  # noqa: ANN001
    """``rid`` at the front of list ``key`` (heads in ``heads[key]``)."""
    first = heads[key]
    nxt[rid] = first
    prev[rid] = NONE
    if first != NONE:
        prev[first] = rid
    heads[key] = rid


@njit(cache=True)
def remove(prev, nxt, heads, key: int, rid: int) -> None:  # noqa: ANN001
    """``rid`` out of list ``key``."""
    p, n = prev[rid], nxt[rid]
    if p == NONE:
        heads[key] = n
    else:
        nxt[p] = n
    if n != NONE:
        prev[n] = p
