"""A load generator's in-flight cap, translated into the uncapped load a replica model knows.

A replica model (the surrogate, ``TwinPredictor``) describes a replica behind an unbounded
client: an overloaded replica's queue grows for the whole window. The reference runs' load
generator failed every request beyond ``cap`` in flight (``twin.validate``), so once the queue
reached the cap it stayed there. Overload costs a replica in proportion to the queue it walks
every step, i.e. to the queue's time integral; the uncapped load with the same integral is

    lambda_eq = mu + 2 C / T - C^2 / ((lambda - mu) T^2)     when (lambda - mu) T > C,

(``lambda`` offered, ``mu`` served, ``C`` the cap, ``T`` the window, all in requests), and
``lambda`` itself when the cap never binds. ``mu`` depends on the load, so
``cap_equivalent_loads`` solves for it with the model's own throughput.

Why this rule: on the 127 reference runs that reached the cap (Prometheus waiting + running), an
uncapped twin run at ``lambda_eq`` lands 7.6 % (Llama) / 8.0 % (Qwen) SMAPE from the capped twin
run, against 27.6 / 23.4 % at the offered load; matching the final queue instead (``mu + C/T``)
gave 7.9 / 8.3 % (docs/surrogate.md). The comparison is twin against twin, not against the
measured results.

A surrogate trained with the capped design reads a capped load directly (its ``capped/`` trees,
``ReplicaLoad.client_max_inflight``); this translation is what ``evaluate_real_runs`` compares
that with, and how it reads the measured runs with a surrogate trained without capped runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from twin.replica import ReplicaLoad


def cap_equivalent_rate(
    offered_rps: np.ndarray, served_rps: np.ndarray, cap: np.ndarray, window_s: np.ndarray
) -> np.ndarray:
    """The uncapped offered rate whose queue has the capped run's time integral (req/s).

    Element-wise; a ``cap`` of ``inf`` (no cap) or a queue that never reaches it keeps the
    offered rate. Never above the offered rate, never below the served one.
    """
    offered, served = np.asarray(offered_rps, float), np.asarray(served_rps, float)
    cap, window = np.asarray(cap, float), np.asarray(window_s, float)
    excess = offered - served
    binds = np.isfinite(cap) & (excess * window > cap)
    with np.errstate(divide="ignore", invalid="ignore"):
        eq = served + 2 * cap / window - cap**2 / (excess * window**2)
    return np.where(binds, np.clip(eq, served, offered), offered)


def cap_equivalent_loads(
    loads: Sequence[ReplicaLoad],
    caps: Sequence[int | None],
    window_s: Sequence[float],
    throughput_tps: Callable[[list[ReplicaLoad]], np.ndarray],
    *,
    iterations: int = 50,
) -> list[ReplicaLoad]:
    """Each load scaled to its ``cap_equivalent_rate`` (adapter mix kept), where the served rate
    is ``throughput_tps`` of the scaled load itself (a lighter load is served faster).

    Solved per load by bisection on ``rate - cap_equivalent_rate(served(rate))`` over
    [0, offered]: it is negative at 0 and >= 0 at the offered rate, and a tree model's served
    rate is piecewise constant, so a plain fixed-point iteration can cycle between two steps.
    ``caps[i]`` None: load ``i`` is returned as is.
    """
    if not (len(loads) == len(caps) == len(window_s)):
        raise ValueError(f"loads ({len(loads)}), caps ({len(caps)}) and window_s "
                         f"({len(window_s)}) differ in length")
    offered = np.array([float(ld.rates_rps.sum()) for ld in loads])
    per_request = np.array([ld.lengths.mean_prompt() + ld.lengths.mean_output() for ld in loads])
    cap = np.array([np.inf if c is None else float(c) for c in caps])
    window = np.asarray(window_s, float)

    def scaled(rate: np.ndarray) -> list[ReplicaLoad]:
        return [_scaled(ld, r, o) for ld, r, o in zip(loads, rate, offered, strict=True)]

    def gap(rate: np.ndarray) -> np.ndarray:
        served = np.asarray(throughput_tps(scaled(rate)), float) / per_request
        return rate - cap_equivalent_rate(offered, served, cap, window)

    lo, hi = np.zeros_like(offered), offered.copy()
    active = gap(offered) > 0  # the cap binds at the offered load: the answer lies below it
    for _ in range(iterations if active.any() else 0):
        mid = np.where(active, 0.5 * (lo + hi), offered)
        g = gap(mid)
        lo, hi = np.where(active & (g < 0), mid, lo), np.where(active & (g >= 0), mid, hi)
    return scaled(hi)


def _scaled(load: ReplicaLoad, rate: float, offered: float) -> ReplicaLoad:
    if rate >= offered or offered <= 0:
        return load
    return ReplicaLoad.trusted(load.adapter_ids, load.ranks, load.rates_rps * (rate / offered),
                               load.lengths)
