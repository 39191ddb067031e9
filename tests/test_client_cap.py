"""The capped client's equivalent load: the queue-integral rule and its solver."""

from __future__ import annotations

import numpy as np
import pytest

from twin.client_cap import cap_equivalent_loads, cap_equivalent_rate
from twin.lengths import LengthModel
from twin.replica import ReplicaLoad

LENGTHS = LengthModel(kind="fixed", prompt=100, output=100)  # 200 tokens per request
T = 3600.0


def _queue_integral(offered: float, served: float, cap: float, window: float) -> float:
    """Request-seconds queued over the window, integrated numerically (queue = excess x t,
    held at the cap)."""
    t = np.linspace(0.0, window, 200_001)
    queue = np.minimum((offered - served) * t, cap)
    return float(np.sum((queue[1:] + queue[:-1]) / 2 * np.diff(t)))


@pytest.mark.parametrize("offered", [20.0, 40.0, 400.0])
def test_equivalent_rate_has_the_capped_queue_integral(offered):
    served, cap = 12.0, 28_232.0
    eq = float(cap_equivalent_rate(np.array([offered]), np.array([served]), np.array([cap]),
                                   np.array([T]))[0])
    assert served < eq < offered
    capped = _queue_integral(offered, served, cap, T)
    uncapped = _queue_integral(eq, served, np.inf, T)
    assert uncapped == pytest.approx(capped, rel=1e-4)


def test_equivalent_rate_keeps_loads_the_cap_never_reaches():
    offered = np.array([10.0, 12.0 + 28_232 / T, 50.0, 50.0])
    served = np.array([12.0, 12.0, 12.0, 12.0])
    cap = np.array([28_232.0, 28_232.0, np.inf, 1e9])
    out = cap_equivalent_rate(offered, served, cap, np.full(4, T))
    # under capacity; queue reaching the cap exactly at the end; no cap; a cap never reached
    np.testing.assert_allclose(out, offered)


def test_equivalent_rate_is_continuous_where_the_cap_starts_to_bind():
    served, cap = 12.0, 28_232.0
    edge = served + cap / T
    below, above = cap_equivalent_rate(np.array([edge * (1 - 1e-9), edge * (1 + 1e-9)]),
                                       np.full(2, served), np.full(2, cap), np.full(2, T))
    assert above == pytest.approx(below, rel=1e-6)
    # and far beyond it, the queue sits at the cap all window: served + 2C/T
    far = cap_equivalent_rate(np.array([1e7]), np.array([served]), np.array([cap]),
                              np.array([T]))[0]
    assert far == pytest.approx(served + 2 * cap / T, rel=1e-4)


def _load(rates: list[float]) -> ReplicaLoad:
    ids = tuple(f"a{i}" for i in range(len(rates)))
    return ReplicaLoad(adapter_ids=ids, ranks=np.full(len(rates), 8), rates_rps=np.array(rates),
                       lengths=LENGTHS)


def _serves_up_to(capacity_rps: float, collapse: float = 1.0):
    """A replica model serving min(rate, capacity) requests/s, times ``collapse`` once
    overloaded (a piecewise function, like a tree model's)."""
    def throughput(loads: list[ReplicaLoad]) -> np.ndarray:
        rates = np.array([ld.rates_rps.sum() for ld in loads])
        served = np.where(rates > capacity_rps, capacity_rps * collapse, rates)
        return served * 200.0
    return throughput


def test_equivalent_loads_solve_for_the_served_rate_and_keep_the_mix():
    """40 req/s offered, 12 served, cap C = 28,232 over T = 3,600 s: the queue binds, and the
    equivalent rate is served + 2C/T - C^2 / ((offered - served) T^2)
    = 12 + 15.6844 - 2.1965 = 25.488 req/s, at which the model still serves 12 (> 12)."""
    loads = [_load([30.0, 10.0]), _load([3.0, 1.0]), _load([300.0, 100.0])]
    out = cap_equivalent_loads(loads, [28_232, 28_232, None], [T, T, T], _serves_up_to(12.0))
    assert out[1] is loads[1]  # under capacity: untouched
    assert out[2] is loads[2]  # no cap: untouched
    rate = out[0].rates_rps.sum()
    assert rate == pytest.approx(25.488, abs=1e-3)
    np.testing.assert_allclose(out[0].rates_rps, [25.488 * 0.75, 25.488 * 0.25], atol=1e-3)
    assert out[0].adapter_ids == loads[0].adapter_ids


def test_equivalent_loads_settle_on_a_consistent_rate_when_overload_collapses():
    """Overloaded, the model serves half its capacity (6 req/s above 12): the rate returned
    must be one the model itself agrees with. On the overloaded side, 100 offered and 6
    served give 6 + 15.6844 - 28,232^2 / (94 x 3,600^2) = 6 + 15.6844 - 0.6543 = 21.030 req/s,
    which is above 12, so the model does serve 6 there: consistent. (On the other side a rate
    r <= 12 would be served in full and equal its own equivalent rate only at r = 100.)"""
    out = cap_equivalent_loads([_load([100.0])], [28_232], [T], _serves_up_to(12.0, 0.5))
    assert out[0].rates_rps.sum() == pytest.approx(21.030, abs=1e-3)


def test_equivalent_loads_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        cap_equivalent_loads([_load([1.0])], [1, 2], [T], _serves_up_to(1.0))
