"""The step's adapter set (vLLM's ``max_loras`` admission rule reads it) and the worker's
adapter caches: GPU slots and the CPU cache, walked as vLLM's worker walks them.

vLLM (``LRUCacheWorkerLoRAManager._apply_adapters``, 0.8.x) walks the step's adapter *set* in
its iteration order (hash order) and, for each adapter, loads it into the CPU cache if absent
(evicting that cache's least recently used entry, which also frees its GPU slot) and activates
it into a GPU slot if absent (evicting the least recently used slot); every adapter it passes is
touched. Adapters of the current batch are not protected: when the previous batch filled every
slot, the eviction for a newcomer can hit an adapter of this batch that the walk has not reached
yet, which is then reloaded further down the walk — a cascade of reloads. The walk runs only in
steps where an adapter that joined the set is missing, so steps without loads cost nothing.

LRU order is derived, not stored: an adapter's position is (last step it was in a batch, its
hash rank), because every adapter of a batch is touched, in hash order, in every step.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from twin.adapters import hash_rank
from twin.engine.state import (
    CPU_N,
    CPU_SLOTS,
    DISK_LOADS,
    GPU_LOADS,
    GPU_N,
    GPU_SLOTS,
    NA,
    NACT,
    NJOINED,
)

_hash_rank = njit(cache=True)(hash_rank)


@njit(cache=True)
def holds(s, a: int) -> bool:  # noqa: ANN001
    """Whether ``a``'s requests pass the LoRA rule now (the base model always does)."""
    return a < 0 or s.count[a] > 0


@njit(cache=True)
def enter(s, a: int) -> None:  # noqa: ANN001
    """A request of adapter ``a`` starts running."""
    if a < 0:
        return
    c = s.count[a]
    s.count[a] = c + 1
    if c == 0:
        s.I[NACT] += 1
        s.active[a] = 1
        s.joined[s.I[NJOINED]] = a
        s.I[NJOINED] += 1


@njit(cache=True)
def leave(s, a: int, step: int) -> None:  # noqa: ANN001
    """A request of adapter ``a`` stopped running in ``step`` (finished or preempted)."""
    if a < 0:
        return
    c = s.count[a] - 1
    s.count[a] = c
    if c == 0:
        s.I[NACT] -= 1
        s.active[a] = 0
        s.last_step[a] = step - 1


@njit(cache=True)
def settle_loads(s, step: int) -> tuple[float, int]:  # noqa: ANN001
    """Load what the adapters that joined this step lack; returns (load ms, loads)."""
    n = s.I[NJOINED]
    if n == 0:
        return 0.0, 0
    s.I[NJOINED] = 0
    for k in range(n):
        a = s.joined[k]
        if s.in_gpu[a] == 0 or s.in_cpu[a] == 0:
            return _walk(s, step, n)
    return 0.0, 0


@njit(cache=True)
def _lru_order(s, members, step: int, new) -> np.ndarray:  # noqa: ANN001
    """``members`` (adapter ids) least recently used first."""
    keys = np.empty(len(members), dtype=np.int64)
    for k in range(len(members)):
        a = members[k]
        seen = step - 1 if (s.active[a] == 1 and new[a] == 0) else s.last_step[a]
        keys[k] = seen * 4294967296 + _hash_rank(a)
    return members[np.argsort(keys)]


@njit(cache=True)
def _lru_victim(s, cached, touched, order, i: int, step: int, new):  # noqa: ANN001, ANN202
    """The least recently used entry of a full cache that this walk has not touched; the LRU
    order is built on first need. Returns (victim, order, its index in the order)."""
    if len(order) == 0:
        order = _lru_order(s, np.flatnonzero(cached[:s.I[NA]]), step, new)
    while touched[order[i]] or not cached[order[i]]:
        i += 1
    return order[i], order, i


@njit(cache=True)
def _walk(s, step: int, n_joined: int) -> tuple[float, int]:  # noqa: ANN001
    ints = s.I
    na = ints[NA]
    new = np.zeros(na, dtype=np.int64)
    for k in range(n_joined):
        new[s.joined[k]] = 1
    batch = np.flatnonzero(s.active[:na])
    ranks = np.empty(len(batch), dtype=np.int64)
    for k in range(len(batch)):
        ranks[k] = _hash_rank(batch[k])
    batch = batch[np.argsort(ranks)]
    touched_gpu = np.zeros(na, dtype=np.int64)
    touched_cpu = np.zeros(na, dtype=np.int64)
    gpu_order = np.empty(0, dtype=np.int64)  # LRU orders, built only if an eviction needs one
    cpu_order = np.empty(0, dtype=np.int64)
    gi = ci = 0
    cost = 0.0
    loads = 0
    for a in batch:
        if s.in_cpu[a]:
            touched_cpu[a] = 1
        else:
            if ints[CPU_N] >= ints[CPU_SLOTS]:
                victim, cpu_order, ci = _lru_victim(s, s.in_cpu, touched_cpu, cpu_order, ci,
                                                    step, new)
                s.in_cpu[victim] = 0
                ints[CPU_N] -= 1
                if s.in_gpu[victim]:  # dropping a registered adapter frees its slot
                    s.in_gpu[victim] = 0
                    ints[GPU_N] -= 1
            s.in_cpu[a] = 1
            ints[CPU_N] += 1
            touched_cpu[a] = 1
            cost += s.disk_ms[a]
            ints[DISK_LOADS] += 1
        if s.in_gpu[a]:
            touched_gpu[a] = 1
        else:
            if ints[GPU_N] >= ints[GPU_SLOTS]:
                victim, gpu_order, gi = _lru_victim(s, s.in_gpu, touched_gpu, gpu_order, gi,
                                                    step, new)
                s.in_gpu[victim] = 0
                ints[GPU_N] -= 1
            s.in_gpu[a] = 1
            ints[GPU_N] += 1
            touched_gpu[a] = 1
            cost += s.gpu_ms[a]
            ints[GPU_LOADS] += 1
            loads += 1
    return cost, loads
