"""Paged KV: the free-block pool and the decoders' block arithmetic (vLLM's KVCacheManager).

Blocks hold ``block_size`` tokens, one is reserved as vLLM's null block, and a request takes its
blocks on demand plus the version's preallocation (``kv_preallocate_blocks``; not capped at
max_model_len, which over-counts at most that many blocks for a request ending within them of
it). A decoding request needs ``1 + preallocation`` new blocks every ``block_size * (1 +
preallocation)`` decode steps; decoders are bucketed by that phase (``due``), so the number that
need a block in a step is one set's size, not a walk over the batch.
"""

from __future__ import annotations

from twin.engine.table import RequestTable


class KVBlocks:
    """The free-block count and the decoders' allocation phases."""

    __slots__ = ("block_size", "pre", "grab", "period", "total", "free", "max_blocks_req",
                 "whole_prompt", "due", "held", "trig0")

    def __init__(self, kv_tokens: int, block_size: int, preallocate: int, max_len: int,
                 whole_prompt: bool, table: RequestTable) -> None:
        self.block_size = block_size
        self.pre = preallocate
        self.grab = 1 + preallocate  # blocks a decode takes at a block boundary (if free)
        self.period = block_size * self.grab  # decode steps between two allocations
        self.total = kv_tokens // block_size - 1  # vLLM reserves one null block
        self.free = self.total
        self.max_blocks_req = -(-max_len // block_size)
        self.whole_prompt = whole_prompt  # admit only if the whole prompt fits (older vLLM)
        self.due: list[set[int]] = [set() for _ in range(self.period)]  # phase -> decoders
        self.held = table.held
        self.trig0 = table.trig0

    def usage(self) -> float:
        return 1.0 - self.free / self.total

    def decoder_blocks(self, rid: int, clock: int) -> int:
        """Blocks a decoder holds at decode clock ``clock``."""
        t0 = self.trig0[rid]
        if clock <= t0:
            return self.held[rid]
        return self.held[rid] + self.grab * ((clock - t0 - 1) // self.period + 1)

    def blocks_to_admit(self, need_total: int, chunk: int) -> tuple[int, int]:
        """(blocks that must be free to admit a request of ``need_total`` tokens whose first
        chunk is ``chunk``, blocks that chunk needs)."""
        bs = self.block_size
        need = -(-chunk // bs)
        return (-(-need_total // bs) if self.whole_prompt else need), need
