"""vLLM's waiting queue, never materialised per arrival.

FCFS order = preempted requests (newest preemption first, negative keys) then every fresh
request in arrival order (key rid + 1). Per adapter, the same order is its preempted deque
followed by its fresh requests from a pointer on. A request that has not arrived yet is simply
not eligible: whether a head has arrived is one comparison with the clock. While the step's
adapter set is full (the ``max_loras`` rule), the next admissible request is the earliest head
of an in-set adapter: a lazy heap over those heads makes that O(log n) per admission instead of
a scan of the queue.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections import deque

import numpy as np

from twin.engine.lora_set import LoraSet
from twin.engine.table import DROPPED, PENDING, REJECTED, RUNNING, WAITING, RequestTable


class WaitingQueue:
    """Arrived, not running requests; counts them without walking them."""

    __slots__ = ("t", "lora", "front", "afront", "aidx", "aptr", "gptr", "heads", "front_key",
                 "ai", "n_fresh_admitted", "n_pre_waiting", "n_dropped", "aborted_ahead",
                 "client_cap")

    def __init__(self, table: RequestTable, lora: LoraSet, client_cap: int | None) -> None:
        self.t = table
        self.lora = lora
        self.front: deque[tuple[int, int]] = deque()  # (key, rid) preempted, global order
        self.afront: dict[int, deque[int]] = {}  # adapter -> preempted rids, queue order
        self.aidx: dict[int, list[int]] = {}  # adapter -> its fresh requests, arrival order
        self.aptr: dict[int, int] = {}  # adapter -> first of them not yet admitted
        self.gptr = 0  # global pointer over fresh requests
        self.heads: list[tuple[int, int]] = []  # (key, rid): heads of in-set adapters
        self.front_key = 0
        self.ai = 0  # requests [0, ai) have arrived
        self.n_fresh_admitted = 0
        self.n_pre_waiting = 0
        self.n_dropped = 0  # arrived requests dropped at the client or aborted
        self.aborted_ahead: list[int] = []  # aborted before the engine saw them arrive
        self.client_cap = client_cap

    # -- requests come in ---------------------------------------------------------------------
    def added(self, first: int) -> None:
        """Index the requests appended to the table from row ``first`` on."""
        t = self.t
        n = len(t)
        new = np.arange(first, n)
        state = np.frombuffer(bytes(t.state[first:n]), dtype=np.uint8)
        new = new[state != REJECTED]
        adp = np.asarray(t.adp[first:n], dtype=np.int64)[new - first]
        order = np.argsort(adp, kind="stable")
        keys, starts = np.unique(adp[order], return_index=True)
        chunks = np.split(new[order], starts[1:]) if len(keys) else []
        for k, chunk in zip(keys.tolist(), chunks, strict=True):
            lst = self.aidx.get(k)
            if lst is None:
                lst = self.aidx[k] = []
                self.aptr[k] = 0
            lst.extend(chunk.tolist())
            if self.lora.holds(k) and self.head(k) >= first:
                self.push_head(k)  # an in-set adapter whose queue was empty

    def add_one(self, rid: int) -> None:
        """Index one appended request (the steppable engine's submit)."""
        t = self.t
        if t.state[rid] == REJECTED:
            return
        a = t.adp[rid]
        lst = self.aidx.get(a)
        if lst is None:
            lst = self.aidx[a] = []
            self.aptr[a] = 0
        lst.append(rid)
        if self.lora.holds(a) and self.head(a) == rid:
            self.push_head(a)

    def arrive(self, now: float, running: int) -> int:
        """Requests that have arrived by ``now`` join; returns how many are waiting. A load
        generator holding at most ``client_cap`` requests in flight fails the rest at once."""
        t = self.t
        ai = self.ai
        new_ai = bisect_right(t.arr, now, ai)
        cap = self.client_cap
        if cap is not None and new_ai > ai:
            state = t.state
            room = cap - (running + ai - t.rejected_before[ai] - self.n_dropped
                          - self.n_fresh_admitted + self.n_pre_waiting)
            for i in range(ai, new_ai):
                if state[i] == PENDING:
                    if room > 0:
                        room -= 1
                    else:
                        state[i] = DROPPED
                        self.n_dropped += 1
        if self.aborted_ahead:
            now_in = [r for r in self.aborted_ahead if r < new_ai]
            self.n_dropped += len(now_in)
            self.aborted_ahead = [r for r in self.aborted_ahead if r >= new_ai]
        self.ai = new_ai
        return (new_ai - t.rejected_before[new_ai] - self.n_dropped - self.n_fresh_admitted
                + self.n_pre_waiting)

    def next_arrival(self) -> int:
        """The next request still to arrive that can be served; -1 if none."""
        t = self.t
        i, n, state = self.ai, len(t), t.state
        while i < n and (state[i] == REJECTED or state[i] == DROPPED):
            i += 1
        return i if i < n else -1

    # -- heads and picks ----------------------------------------------------------------------
    def head(self, a: int) -> int:
        """Adapter ``a``'s first waiting request (arrived or not); -1 if none."""
        f = self.afront.get(a)
        if f:
            return f[0]
        lst = self.aidx.get(a)
        if lst is None:
            return -1
        p = self.aptr[a]
        state = self.t.state
        while p < len(lst) and state[lst[p]] == DROPPED:
            p += 1
        self.aptr[a] = p
        return lst[p] if p < len(lst) else -1

    def push_head(self, a: int) -> None:
        h = self.head(a)
        if h >= 0:
            heapq.heappush(self.heads, (self.t.wkey[h], h))

    def first_in_set(self) -> int:
        """The earliest waiting request of an in-set adapter (or the base model); -1 if none."""
        t, heads, lora = self.t, self.heads, self.lora
        state, wkey, adp = t.state, t.wkey, t.adp
        while heads:
            k, r = heads[0]
            a = adp[r]
            if (wkey[r] == k and (state[r] == WAITING or state[r] == PENDING)
                    and lora.holds(a) and self.head(a) == r):
                return r
            heapq.heappop(heads)
            if state[r] == DROPPED and lora.holds(a):
                self.push_head(a)  # it was this adapter's (not yet arrived) head
        return -1

    def first(self) -> int:
        """The earliest waiting request, FCFS; -1 if none."""
        t = self.t
        state, wkey, front = t.state, t.wkey, self.front
        while front:
            k, r = front[0]
            if state[r] == WAITING and wkey[r] == k:
                return r
            front.popleft()
        n = len(t)
        g = self.gptr
        while g < n and state[g] != PENDING:
            g += 1
        self.gptr = g
        return g if g < n else -1

    # -- requests leave or come back ----------------------------------------------------------
    def take(self, rid: int) -> None:
        """``rid`` (a head) is admitted."""
        t = self.t
        a = t.adp[rid]
        if t.state[rid] == PENDING:
            self.head(a)  # moves the pointer past requests dropped at the client
            self.aptr[a] += 1
            self.n_fresh_admitted += 1
        else:
            self.afront[a].popleft()
            self.n_pre_waiting -= 1
        t.state[rid] = RUNNING

    def put_back(self, rid: int) -> None:
        """A preempted request goes back to the front of the queue."""
        t = self.t
        t.state[rid] = WAITING
        self.n_pre_waiting += 1
        a = t.adp[rid]
        self.front_key -= 1
        key = self.front_key
        t.wkey[rid] = key
        q = self.afront.get(a)
        if q is None:
            q = self.afront[a] = deque()
        q.appendleft(rid)
        self.front.appendleft((key, rid))
        if self.lora.holds(a):
            heapq.heappush(self.heads, (key, rid))

    def abort(self, rid: int) -> None:
        """A waiting request's client went away: it leaves the queue."""
        t = self.t
        if t.state[rid] == WAITING:
            self.afront[t.adp[rid]].remove(rid)
            self.n_pre_waiting -= 1
        elif rid < self.ai:
            self.n_dropped += 1
        else:
            self.aborted_ahead.append(rid)
        t.state[rid] = DROPPED

    def position(self, rid: int, nwait0: int, npre0: int, n_admitted: int) -> int:
        """Approximate queue position of ``rid`` among the step's ``nwait0`` waiting requests.

        Preempted requests sit at the head. Fresh ones follow in arrival order; waiting ones are
        taken as spread evenly over the ids from the oldest pending to the newest arrived, which
        keeps this O(1) (an exact count would cost a tree update per admission).
        """
        if rid < 0:
            return n_admitted
        t = self.t
        if t.wkey[rid] < 0:
            return min(nwait0, n_admitted + 1)
        n, state = len(t), t.state
        g = self.gptr
        while g < n and state[g] != PENDING:
            g += 1
        self.gptr = g
        span = self.ai - g
        est = npre0 + ((nwait0 - npre0) * (rid - g + 1) // span if span > 0 else 0)
        return max(n_admitted + (state[rid] != RUNNING), min(nwait0, est))
