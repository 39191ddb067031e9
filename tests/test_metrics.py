"""Benchmark-style metrics on hand-made request records."""

from __future__ import annotations

import numpy as np
import pytest

from twin.metrics import RequestRecords, aggregate_metrics, per_adapter_metrics, weighted_quantile

NAN = float("nan")


def records() -> RequestRecords:
    # r0 completes; r1 finishes after the 10 s window; r2 completes with a single token;
    # r3 never got a token
    return RequestRecords(
        arrival_s=np.array([0.0, 2.0, 4.0, 9.0]),
        adapter=np.array([0, 1, 0, 1]),
        prompt_len=np.array([10, 10, 20, 7]),
        output_len=np.array([5, 10, 1, 3]),
        first_token_s=np.array([1.0, 2.5, 5.0, NAN]),
        finish_s=np.array([3.0, 12.0, 6.0, NAN]),
        generated=np.array([5, 10, 1, 0]),
        preemptions=np.array([0, 1, 0, 0]),
        rejected=np.zeros(4, bool),
    )


def test_throughput_counts_completed_requests_in_the_window_only():
    m = aggregate_metrics(records(), 10.0, np.array([]), np.array([]), np.array([]))
    assert m["completed"] == 2
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 6
    assert m["total_throughput_tps"] == pytest.approx(3.6)
    assert m["request_throughput_rps"] == pytest.approx(0.2)
    assert m["offered_total_tps"] == pytest.approx((15 + 20 + 21 + 10) / 10)


def test_latencies_are_over_completed_requests():
    m = aggregate_metrics(records(), 10.0, np.array([]), np.array([]), np.array([]))
    assert m["ttft_mean_ms"] == pytest.approx((1000 + 1000) / 2)
    # TPOT only where more than one token: r0 (3000 - 1000) / 4
    assert m["tpot_mean_ms"] == pytest.approx(500)
    assert m["itl_mean_ms"] == pytest.approx(500)


def test_starvation_is_completed_tokens_below_90_percent_of_offered():
    m = aggregate_metrics(records(), 10.0, np.array([]), np.array([]), np.array([]))
    assert m["completed_token_fraction"] == pytest.approx(36 / 66)
    assert m["starved"] is True
    m = aggregate_metrics(records(), 20.0, np.array([]), np.array([]), np.array([]))
    assert m["completed"] == 3 and m["starved"] is True  # r3 (10 tokens) still missing: 56/66
    assert m["completed_token_fraction"] == pytest.approx(56 / 66)


def test_itl_percentiles_are_token_weighted():
    gaps = np.array([10.0, 100.0])
    w = np.array([99, 1])
    m = aggregate_metrics(records(), 10.0, gaps, w, np.array([]))
    assert m["itl_median_ms"] == 10.0
    assert m["itl_p99_ms"] == 10.0
    assert weighted_quantile(gaps, w, 0.995) == 100.0
    assert np.isnan(weighted_quantile(np.array([]), np.array([]), 0.5))


def test_per_adapter_rows():
    rows = per_adapter_metrics(records(), 10.0, ["a", "b"])
    a, b = rows
    assert a["completed"] == 2 and b["completed"] == 0
    assert a["starved"] is False and b["starved"] is True
    assert a["ttft_mean_ms"] == pytest.approx(1000)
    assert np.isnan(b["ttft_mean_ms"])


def test_the_twins_compiled_quantiles_equal_the_sorted_ones():
    """``twin.engine.quantiles`` (a selection, what twin runs use) gives exactly the values of
    ``weighted_quantiles`` (a sort, what measured runs use) on tie-heavy random samples."""
    from twin.engine.quantiles import weighted_quantiles as selected

    rng = np.random.default_rng(0)
    for k in range(2000):
        n = int(rng.integers(1, 60))
        vals = rng.integers(0, 8, n).astype(float) * (1.0 if k % 2 else 0.37)
        w = rng.integers(1, 5, n).astype(float)
        qs = (0.5, 0.99, 0.0001, 1.0, float(rng.random()))
        assert selected(vals, w, qs) == weighted_quantile_list(vals, w, qs), (vals, w, qs)
    assert np.isnan(selected(np.array([]), np.array([]), (0.5,))[0])


def weighted_quantile_list(vals, w, qs):  # noqa: ANN001, ANN201
    return [weighted_quantile(vals, w, q) for q in qs]
