"""The request table: one column per request attribute (struct of arrays), appended by submit.

Why columns of plain lists: the engine touches a handful of attributes of a few requests per
step, and list indexing is the cheapest access Python has; a request object per row would cost
an attribute lookup and an allocation each.
"""

from __future__ import annotations

import math

import numpy as np

# request states
PENDING, WAITING, RUNNING, DONE, REJECTED, DROPPED, ABORTED = 0, 1, 2, 3, 4, 5, 6


class RequestTable:
    """Per-request columns; a request's id is its row (requests are submitted in arrival order).

    Decoding requests are not touched per step: ``gen`` and ``held`` are their values when they
    entered decode (clock ``dc_in``), from which the current ones are derived.
    """

    __slots__ = ("arr", "adp", "plen", "olen", "state", "gen", "ncomp", "held", "dc_in",
                 "trig0", "pos", "epoch", "is_dec", "first_t", "fin_t", "npre", "resume_t",
                 "wkey", "rejected_before")

    def __init__(self) -> None:
        self.arr: list[float] = []  # arrival time (s), non-decreasing
        self.adp: list[int] = []  # adapter index, -1 = base model
        self.plen: list[int] = []
        self.olen: list[int] = []
        self.state = bytearray()
        self.gen: list[int] = []  # generated tokens (decoders: at decode entry)
        self.ncomp: list[int] = []  # computed tokens (prefill phase)
        self.held: list[int] = []  # KV blocks (decoders: at decode entry)
        self.dc_in: list[int] = []  # decode clock at decode entry
        self.trig0: list[int] = []  # first decode clock at which a decoder needs a block
        self.pos: list[int] = []  # running-order stamp
        self.epoch: list[int] = []  # bumped when a decoder's finish entry becomes stale
        self.is_dec = bytearray()
        self.first_t: list[float] = []
        self.fin_t: list[float] = []
        self.npre: list[int] = []
        self.resume_t: list[float] = []  # time of the last token before a preemption
        self.wkey: list[int] = []  # FCFS key: rid + 1 when fresh, negative once preempted
        self.rejected_before: list[int] = [0]  # rejected requests among the first i

    def __len__(self) -> int:
        return len(self.arr)

    def append(self, arrival_s: float, adapter: int, prompt_len: int, output_len: int,
               max_len: int) -> int:
        """Add a request; one longer than ``max_len`` is rejected at once (as vLLM's
        frontend rejects it). Returns its id."""
        rid = len(self.arr)
        if self.arr and arrival_s < self.arr[-1]:
            raise ValueError(f"arrival_s: requests must arrive in order, got {arrival_s} after "
                             f"{self.arr[-1]}")
        rejected = prompt_len + output_len > max_len
        self.arr.append(arrival_s)
        self.adp.append(adapter)
        self.plen.append(prompt_len)
        self.olen.append(output_len)
        self.state.append(REJECTED if rejected else PENDING)
        for col in (self.gen, self.ncomp, self.held, self.dc_in, self.trig0, self.pos,
                    self.epoch, self.npre):
            col.append(0)
        self.is_dec.append(0)
        self.first_t.append(math.nan)
        self.fin_t.append(math.nan)
        self.resume_t.append(math.nan)
        self.wkey.append(rid + 1)
        self.rejected_before.append(self.rejected_before[-1] + rejected)
        return rid

    def extend(self, arrival_s: np.ndarray, adapter: np.ndarray, prompt_len: np.ndarray,
               output_len: np.ndarray, max_len: int) -> None:
        """``append`` for many arrival-sorted requests at once (a whole workload)."""
        arr = np.asarray(arrival_s, dtype=float)
        if len(arr) and ((self.arr and arr[0] < self.arr[-1]) or np.any(np.diff(arr) < 0)):
            raise ValueError("arrival_s: requests must arrive in order")
        n0, k = len(self.arr), len(arr)
        plen = np.asarray(prompt_len, dtype=np.int64)
        olen = np.asarray(output_len, dtype=np.int64)
        rejected = plen + olen > max_len
        self.arr.extend(arr.tolist())
        self.adp.extend(np.asarray(adapter, dtype=np.int64).tolist())
        self.plen.extend(plen.tolist())
        self.olen.extend(olen.tolist())
        self.state.extend(np.where(rejected, REJECTED, PENDING).astype(np.uint8).tobytes())
        zeros = [0] * k
        for col in (self.gen, self.ncomp, self.held, self.dc_in, self.trig0, self.pos,
                    self.epoch, self.npre):
            col.extend(zeros)
        self.is_dec.extend(bytes(k))
        nans = [math.nan] * k
        self.first_t.extend(nans)
        self.fin_t.extend(nans)
        self.resume_t.extend(nans)
        self.wkey.extend(range(n0 + 1, n0 + k + 1))
        self.rejected_before.extend(
            (self.rejected_before[-1] + np.cumsum(rejected)).tolist())
