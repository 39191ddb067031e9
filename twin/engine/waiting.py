"""vLLM's waiting queue, never materialised per arrival.

FCFS order = preempted requests (newest preemption first, negative keys) then every fresh
request in arrival order (key rid + 1). Per adapter, the same order is its preempted requests
followed by its fresh ones from a pointer on (``fresh_head``, skipping requests dropped at the
client). A request that has not arrived yet is simply not eligible: whether a head has arrived is
one comparison with the clock. While the step's adapter set is full (the ``max_loras`` rule),
the next admissible request is the earliest head of an in-set adapter: a lazy heap over those
heads (``heads``) makes that O(log n) per admission instead of a scan of the queue.
"""

from __future__ import annotations

from numba import njit

from twin.engine.heaps import heap_pop, heap_push, stack_push
from twin.engine.links import push_front, remove
from twin.engine.lora_set import holds
from twin.engine.state import (
    AI,
    CLIENT_CAP,
    DROPPED,
    FRONT_KEY,
    FRONT_N,
    GPTR,
    HEADS_N,
    N_DROP,
    N_FRESH,
    N_PREW,
    NONE,
    PENDING,
    REJECTED,
    RUNNING,
    WAITING,
    N,
)


@njit(cache=True)
def add(s, rid: int) -> None:  # noqa: ANN001
    """Index an appended request (its row is filled in)."""
    if s.state[rid] == REJECTED:
        return
    q = s.adp[rid] + 1
    tail = s.fresh_tail[q]
    s.fresh_next[rid] = NONE
    if tail != NONE:
        s.fresh_next[tail] = rid
    s.fresh_tail[q] = rid
    if s.fresh_head[q] == NONE:
        s.fresh_head[q] = rid
    a = s.adp[rid]
    if holds(s, a) and head(s, a) == rid:
        push_head(s, a)  # an in-set adapter whose queue was empty


@njit(cache=True)
def add_all(s, first: int) -> None:  # noqa: ANN001
    for rid in range(first, s.I[N]):
        add(s, rid)


@njit(cache=True)
def waiting(s) -> int:  # noqa: ANN001
    ints = s.I
    ai = ints[AI]
    return ai - s.rej_before[ai] - ints[N_DROP] - ints[N_FRESH] + ints[N_PREW]


@njit(cache=True)
def arrive(s, now: float, running: int) -> int:  # noqa: ANN001
    """Requests that have arrived by ``now`` join; returns how many are waiting. A load
    generator holding at most ``CLIENT_CAP`` requests in flight fails the rest at once."""
    ints = s.I
    ai = ints[AI]
    n = ints[N]
    new_ai = ai
    while new_ai < n and s.arr[new_ai] <= now:
        new_ai += 1
    cap = ints[CLIENT_CAP]
    if cap >= 0 and new_ai > ai:
        room = cap - (running + waiting(s))
        for i in range(ai, new_ai):
            if s.state[i] == PENDING:
                if room > 0:
                    room -= 1
                else:
                    s.state[i] = DROPPED
                    ints[N_DROP] += 1
    ahead = s.aborted_ahead
    if len(ahead):
        k = 0
        while k < len(ahead):
            if ahead[k] < new_ai:
                ints[N_DROP] += 1
                ahead[k] = ahead[len(ahead) - 1]
                ahead.pop()
            else:
                k += 1
    ints[AI] = new_ai
    return waiting(s)


@njit(cache=True)
def next_arrival(s) -> int:  # noqa: ANN001
    """The next request still to arrive that can be served; NONE if none."""
    i, n = s.I[AI], s.I[N]
    while i < n and (s.state[i] == REJECTED or s.state[i] == DROPPED):
        i += 1
    return i if i < n else NONE


@njit(cache=True)
def head(s, a: int) -> int:  # noqa: ANN001
    """Adapter ``a``'s first waiting request (arrived or not); NONE if none."""
    q = a + 1
    f = s.af_head[q]
    if f != NONE:
        return f
    h = s.fresh_head[q]
    while h != NONE and s.state[h] == DROPPED:
        h = s.fresh_next[h]
    s.fresh_head[q] = h
    return h


@njit(cache=True)
def push_head(s, a: int) -> None:  # noqa: ANN001
    h = head(s, a)
    if h != NONE:
        s.I[HEADS_N] = heap_push(s.heads, s.I[HEADS_N], s.wkey[h], h, 0)


@njit(cache=True)
def first_in_set(s) -> int:  # noqa: ANN001
    """The earliest waiting request of an in-set adapter (or the base model); NONE if none."""
    ints = s.I
    while ints[HEADS_N]:
        buf = s.heads[0]
        k, r = buf[0, 0], buf[0, 1]
        a = s.adp[r]
        st = s.state[r]
        if (s.wkey[r] == k and (st in (WAITING, PENDING)) and holds(s, a)
                and head(s, a) == r):
            return r
        ints[HEADS_N] = heap_pop(s.heads, ints[HEADS_N])
        if st == DROPPED and holds(s, a):
            push_head(s, a)  # it was this adapter's (not yet arrived) head
    return NONE


@njit(cache=True)
def first(s) -> int:  # noqa: ANN001
    """The earliest waiting request, FCFS; NONE if none."""
    ints = s.I
    while ints[FRONT_N]:
        buf = s.front[0]
        k, r = buf[ints[FRONT_N] - 1, 0], buf[ints[FRONT_N] - 1, 1]
        if s.state[r] == WAITING and s.wkey[r] == k:
            return r
        ints[FRONT_N] -= 1
    return _oldest_pending(s)


@njit(cache=True)
def _oldest_pending(s) -> int:  # noqa: ANN001
    ints = s.I
    g, n = ints[GPTR], ints[N]
    while g < n and s.state[g] != PENDING:
        g += 1
    ints[GPTR] = g
    return g if g < n else NONE


@njit(cache=True)
def take(s, rid: int) -> None:  # noqa: ANN001
    """``rid`` (a head) is admitted."""
    q = s.adp[rid] + 1
    if s.state[rid] == PENDING:
        head(s, s.adp[rid])  # moves the pointer past requests dropped at the client
        s.fresh_head[q] = s.fresh_next[s.fresh_head[q]]
        s.I[N_FRESH] += 1
    else:
        remove(s.af_prev, s.af_next, s.af_head, q, rid)  # (the head)
        s.I[N_PREW] -= 1
    s.state[rid] = RUNNING


@njit(cache=True)
def put_back(s, rid: int) -> None:  # noqa: ANN001
    """A preempted request goes back to the front of the queue."""
    ints = s.I
    s.state[rid] = WAITING
    ints[N_PREW] += 1
    a = s.adp[rid]
    ints[FRONT_KEY] -= 1
    key = ints[FRONT_KEY]
    s.wkey[rid] = key
    push_front(s.af_prev, s.af_next, s.af_head, a + 1, rid)
    ints[FRONT_N] = stack_push(s.front, ints[FRONT_N], key, rid)
    if holds(s, a):
        ints[HEADS_N] = heap_push(s.heads, ints[HEADS_N], key, rid, 0)


@njit(cache=True)
def abort(s, rid: int) -> None:  # noqa: ANN001
    """A waiting request's client went away: it leaves the queue."""
    ints = s.I
    if s.state[rid] == WAITING:
        remove(s.af_prev, s.af_next, s.af_head, s.adp[rid] + 1, rid)
        ints[N_PREW] -= 1
    elif rid < ints[AI]:
        ints[N_DROP] += 1
    else:
        s.aborted_ahead.append(rid)
    s.state[rid] = DROPPED


@njit(cache=True)
def position(s, rid: int, nwait0: int, npre0: int, n_admitted: int) -> int:  # noqa: ANN001
    """Approximate queue position of ``rid`` among the step's ``nwait0`` waiting requests.

    Preempted requests sit at the head. Fresh ones follow in arrival order; waiting ones are
    taken as spread evenly over the ids from the oldest pending to the newest arrived, which
    keeps this O(1) (an exact count would cost a tree update per admission).
    """
    if rid < 0:
        return n_admitted
    if s.wkey[rid] < 0:
        return min(nwait0, n_admitted + 1)
    g = _oldest_pending(s)
    if g == NONE:
        g = s.I[N]
    span = s.I[AI] - g
    est = npre0 + ((nwait0 - npre0) * (rid - g + 1) // span if span > 0 else 0)
    return max(n_admitted + (1 if s.state[rid] != RUNNING else 0), min(nwait0, est))
