"""The running requests: running order, the prefill-phase subset and the decoders' aggregates.

Decoders advance together on one decode clock ``dc`` (one token per step each), so none is
touched per step: a decoder stores the clock at which it entered decode; its token count, its
blocks and its finishing clock follow from it (finishes are bucketed by clock). The step's
context is ``s_nb + ndec * (dc + 1)``.
"""

from __future__ import annotations

from twin.engine.kv_blocks import KVBlocks
from twin.engine.table import RequestTable


class RunningSet:
    """vLLM's ``running`` list, with O(1) aggregates for the decoders."""

    __slots__ = ("t", "kv", "order", "prefilling", "ndec", "s_nb", "fin_at", "dc", "pos_ctr")

    def __init__(self, table: RequestTable, kv: KVBlocks) -> None:
        self.t = table
        self.kv = kv
        self.order: dict[int, None] = {}  # running requests, oldest first
        self.prefilling: list[int] = []  # running requests still in prefill, in order
        self.ndec = 0
        self.s_nb = 0  # sum over decoders of (computed tokens - decode clock)
        self.fin_at: dict[int, list[tuple[int, int]]] = {}  # clock -> [(rid, epoch)] finishing
        self.dc = 0  # decode clock: decode steps taken
        self.pos_ctr = 0

    def __len__(self) -> int:
        return len(self.order)

    def admit(self, rid: int) -> None:
        """A waiting request starts running (at the tail, in prefill)."""
        self.pos_ctr += 1
        self.t.pos[rid] = self.pos_ctr
        self.order[rid] = None
        self.prefilling.append(rid)

    def add_decoder(self, rid: int, h: int) -> None:
        """Register a request that will decode from clock ``dc`` on, holding ``h`` blocks."""
        t, kv, dc = self.t, self.kv, self.dc
        t.is_dec[rid] = 1
        self.ndec += 1
        nc = t.plen[rid] + t.gen[rid] - 1
        self.s_nb += nc - dc
        t.dc_in[rid] = dc
        t.held[rid] = h
        t0 = dc + h * kv.block_size - nc
        t.trig0[rid] = t0
        kv.due[t0 % kv.period].add(rid)
        key = dc + t.olen[rid] - t.gen[rid]
        lst = self.fin_at.get(key)
        if lst is None:
            self.fin_at[key] = [(rid, t.epoch[rid])]
        else:
            lst.append((rid, t.epoch[rid]))

    def remove_decoder(self, rid: int) -> int:
        """Detach a decoder from the aggregates (its tokens so far become ``gen``); returns
        its KV blocks."""
        t, kv, dc = self.t, self.kv, self.dc
        t.is_dec[rid] = 0
        self.ndec -= 1
        self.s_nb -= t.plen[rid] + t.gen[rid] - 1 - t.dc_in[rid]
        kv.due[t.trig0[rid] % kv.period].discard(rid)
        t.gen[rid] += dc - t.dc_in[rid]
        return kv.decoder_blocks(rid, dc)

    def release(self, rid: int) -> int:
        """Take ``rid`` out of the running set; returns the KV blocks it held."""
        del self.order[rid]
        if self.t.is_dec[rid]:
            return self.remove_decoder(rid)
        self.prefilling.remove(rid)
        return self.t.held[rid]

    def generated(self, rid: int) -> int:
        """Output tokens of ``rid`` so far."""
        t = self.t
        return t.gen[rid] + (self.dc - t.dc_in[rid] if t.is_dec[rid] else 0)
