"""Weighted quantiles by selection, compiled: ``twin.metrics.weighted_quantiles`` without the
sort. A twin hour has ~10^5-10^6 step gaps; sorting them twice cost as much as the hour's
simulation. Same answer as the sort (``tests/test_metrics.py``): integer weights keep every
partial sum exact."""

from __future__ import annotations

import numpy as np
from numba import njit


def weighted_quantiles(values: np.ndarray, weights: np.ndarray,
                       qs: tuple[float, ...]) -> list[float]:
    """For each q, the first value in sorted order whose cumulative weight reaches q of the
    total (nan if empty)."""
    total = float(weights.sum()) if len(values) else 0.0
    if total <= 0:
        return [float("nan")] * len(qs)
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float)
    return [float(_select(v.copy(), w.copy(), q * total)) for q in qs]


@njit(cache=True)
def _select(v: np.ndarray, w: np.ndarray, target: float) -> float:
    """Smallest x with weight(values <= x) >= target (three-way quickselect, in place)."""
    lo, hi = 0, len(v)
    below = 0.0  # weight of the values known to lie below v[lo:hi]
    while hi - lo > 1:
        a, b, c = v[lo], v[(lo + hi) // 2], v[hi - 1]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        lt, i, gt = lo, lo, hi  # [lo, lt) < pivot, [lt, i) == pivot, [gt, hi) > pivot
        w_lt = w_eq = 0.0
        while i < gt:
            x = v[i]
            if x < pivot:
                v[i], v[lt] = v[lt], x
                w[i], w[lt] = w[lt], w[i]
                w_lt += w[lt]
                lt += 1
                i += 1
            elif x > pivot:
                gt -= 1
                v[i], v[gt] = v[gt], x
                w[i], w[gt] = w[gt], w[i]
            else:
                w_eq += w[i]
                i += 1
        if below + w_lt >= target:
            hi = lt
        elif below + w_lt + w_eq >= target:
            return pivot
        else:
            below += w_lt + w_eq
            lo = gt
    return v[lo] if hi > lo else v[lo - 1]
