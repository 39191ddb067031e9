"""The step's adapter set (vLLM's ``max_loras`` admission rule reads it) and the worker's
adapter caches (GPU slots, CPU cache: ``twin.adapters.AdapterCaches``, vLLM's LRU walk)."""

from __future__ import annotations

from twin.adapters import AdapterCaches


class LoraSet:
    """Running requests per adapter; an adapter is in the set while it has one."""

    __slots__ = ("count", "n", "active", "joined", "caches")

    def __init__(self, caches: AdapterCaches) -> None:
        self.count: dict[int, int] = {}  # adapter -> running requests
        self.n = 0  # adapters in the set
        self.active: set[int] = set()
        self.joined: list[int] = []  # adapters that entered the set this step
        self.caches = caches

    def holds(self, adapter: int) -> bool:
        """Whether ``adapter``'s requests pass the LoRA rule now (the base model always does)."""
        return adapter < 0 or self.count.get(adapter, 0) > 0

    def enter(self, adapter: int) -> bool:
        """A request of ``adapter`` starts running; True when the adapter joined the set."""
        if adapter < 0:
            return False
        c = self.count.get(adapter, 0)
        self.count[adapter] = c + 1
        if c:
            return False
        self.n += 1
        self.active.add(adapter)
        self.joined.append(adapter)
        return True

    def leave(self, adapter: int, step: int) -> None:
        """A request of ``adapter`` stopped running in ``step`` (finished or preempted)."""
        if adapter < 0:
            return
        c = self.count[adapter] - 1
        self.count[adapter] = c
        if c == 0:
            self.n -= 1
            self.active.discard(adapter)
            self.caches.left_batch(adapter, step - 1)

    def settle_loads(self, step: int) -> tuple[float, int]:
        """Load what the adapters that joined this step lack; returns (load ms, loads)."""
        load_ms, loads = 0.0, 0
        if self.joined:
            caches = self.caches
            if any(caches.missing(a) for a in self.joined):
                load_ms, loads = caches.apply(self.active, self.joined, step)
            self.joined.clear()
        return load_ms, loads
