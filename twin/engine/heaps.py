"""Binary min-heaps and a stack in growable int64 buffers (compiled): the waiting queue's heads,
the decoders' finishing clocks, the preempted requests. A buffer is an array held in a one-item
list, so compiled code can replace it with a bigger one; rows are ordered by column 0."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _room(box, n):  # noqa: ANN001, ANN202
    buf = box[0]
    if n == buf.shape[0]:
        big = np.empty((2 * n, buf.shape[1]), dtype=np.int64)
        big[:n] = buf
        box[0] = big
        buf = big
    return buf


@njit(cache=True)
def _move(buf, dst: int, src: int, wide: bool) -> None:  # noqa: ANN001
    buf[dst, 0] = buf[src, 0]
    buf[dst, 1] = buf[src, 1]
    if wide:
        buf[dst, 2] = buf[src, 2]


@njit(cache=True)
def heap_push(box, n: int, a: int, b: int, c: int) -> int:  # noqa: ANN001
    """Push row (a, b[, c]) onto the heap of ``n`` rows; returns the new size."""
    buf = _room(box, n)
    wide = buf.shape[1] > 2
    i = n
    while i > 0:
        parent = (i - 1) >> 1
        if buf[parent, 0] <= a:
            break
        _move(buf, i, parent, wide)
        i = parent
    buf[i, 0] = a
    buf[i, 1] = b
    if wide:
        buf[i, 2] = c
    return n + 1


@njit(cache=True)
def heap_pop(box, n: int) -> int:  # noqa: ANN001
    """Drop the top row of the heap of ``n`` rows (read it first); returns the new size."""
    buf = box[0]
    n -= 1
    if n == 0:
        return 0
    wide = buf.shape[1] > 2
    l0 = buf[n, 0]
    l1 = buf[n, 1]
    l2 = buf[n, 2] if wide else 0
    i = 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and buf[child + 1, 0] < buf[child, 0]:
            child += 1
        if l0 <= buf[child, 0]:
            break
        _move(buf, i, child, wide)
        i = child
    buf[i, 0] = l0
    buf[i, 1] = l1
    if wide:
        buf[i, 2] = l2
    return n


@njit(cache=True)
def stack_push(box, n: int, a: int, b: int) -> int:  # noqa: ANN001
    buf = _room(box, n)
    buf[n, 0] = a
    buf[n, 1] = b
    return n + 1
