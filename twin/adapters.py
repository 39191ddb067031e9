"""vLLM's worker-side LoRA caches: which adapters sit in the CPU cache and in the GPU slots,
and what loading them costs in a step.

vLLM (``LRUCacheWorkerLoRAManager._apply_adapters``, 0.8.x) walks the step's adapter *set* in
its iteration order (hash order) and, for each adapter, loads it into the CPU cache if absent
(evicting that cache's least recently used entry, which also frees its GPU slot) and activates
it into a GPU slot if absent (evicting the least recently used slot); every adapter it passes is
touched. Adapters of the current batch are not protected: when the previous batch filled every
slot, the eviction for a newcomer can hit an adapter of this batch that the walk has not reached
yet, which is then reloaded further down the walk — a cascade of reloads. This module reproduces
that walk exactly, but only in steps where some adapter of the batch is missing, so steps without
loads cost nothing.

LRU order is derived, not stored: an adapter's position is (last step it was in a batch, its
hash rank), because every adapter of a batch is touched, in hash order, in every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def hash_rank(adapter: int) -> int:
    """A fixed pseudo-random order of adapters, standing in for Python's set iteration order."""
    return ((adapter + 1) * 2654435761) & 0xFFFFFFFF


class AdapterCaches:
    """CPU cache (``cpu_slots``) and GPU slots (``gpu_slots``) with vLLM's LRU walk."""

    __slots__ = ("gpu_slots", "cpu_slots", "gpu_ms", "disk_ms", "gpu", "cpu", "last_step",
                 "gpu_loads", "disk_loads")

    def __init__(
        self,
        gpu_slots: int,
        cpu_slots: int,
        gpu_ms: Sequence[float],
        disk_ms: Sequence[float],
        preloaded: Iterable[int] = (),
    ) -> None:
        self.gpu_slots = gpu_slots
        self.cpu_slots = cpu_slots
        self.gpu_ms = gpu_ms
        self.disk_ms = disk_ms
        self.gpu: set[int] = set()
        self.cpu: set[int] = set(preloaded)
        self.last_step: dict[int, int] = dict.fromkeys(self.cpu, -1)
        self.gpu_loads = 0
        self.disk_loads = 0

    def missing(self, adapter: int) -> bool:
        """True when using ``adapter`` in a step costs a load."""
        return adapter not in self.gpu or adapter not in self.cpu

    def left_batch(self, adapter: int, step: int) -> None:
        """``adapter`` was last in the batch of ``step`` (its LRU position from now on)."""
        self.last_step[adapter] = step

    def apply(self, batch: set[int], joined: Iterable[int], step: int) -> tuple[float, int]:
        """Load what the batch of ``step`` lacks; returns (load ms, loads).

        ``batch`` is every adapter with requests in this step, ``joined`` those that were not in
        the previous step's batch.
        """
        new = set(joined)
        last = self.last_step

        def lru_key(a: int) -> tuple[int, int]:
            seen = step - 1 if (a in batch and a not in new) else last.get(a, -2)
            return (seen, hash_rank(a))

        gpu_order: list[int] = []  # LRU orders, built only if an eviction needs one
        cpu_order: list[int] = []
        gi = ci = 0
        touched_gpu: set[int] = set()
        touched_cpu: set[int] = set()
        cost = 0.0
        loads = 0
        for a in sorted(batch, key=hash_rank):
            if a in self.cpu:
                touched_cpu.add(a)
            else:
                if len(self.cpu) >= self.cpu_slots:
                    if not cpu_order:
                        cpu_order = sorted(self.cpu, key=lru_key)
                    while cpu_order[ci] in touched_cpu or cpu_order[ci] not in self.cpu:
                        ci += 1
                    victim = cpu_order[ci]
                    self.cpu.discard(victim)
                    self.gpu.discard(victim)  # dropping a registered adapter frees its slot
                self.cpu.add(a)
                touched_cpu.add(a)
                cost += self.disk_ms[a]
                self.disk_loads += 1
            if a in self.gpu:
                touched_gpu.add(a)
            else:
                if len(self.gpu) >= self.gpu_slots:
                    if not gpu_order:
                        gpu_order = sorted(self.gpu, key=lru_key)
                    while gpu_order[gi] in touched_gpu or gpu_order[gi] not in self.gpu:
                        gi += 1
                    self.gpu.discard(gpu_order[gi])
                self.gpu.add(a)
                touched_gpu.add(a)
                cost += self.gpu_ms[a]
                self.gpu_loads += 1
                loads += 1
        return cost, loads
