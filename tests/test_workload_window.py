"""The live workload estimate (orchestrator/control/window.py): telemetry batches in, coverage
and a twin Workload out. Synthetic batches: per-second Poisson arrivals split over replicas, so
every expected rate follows from the construction."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from orchestrator.control.window import (
    MIN_FINISHED_FOR_LENGTHS,
    TelemetryBatch,
    WorkloadWindow,
    rescale_lengths,
)
from twin.lengths import LengthModel

FIXED = LengthModel(kind="fixed", prompt=100, output=50)


def batch(replica: str, t: float, arrivals: dict[str, int], *, dt: float = 1.0,
          prompt: int = 200, output: int = 80, **kw) -> TelemetryBatch:
    """One push: every arrival also finishes in the interval with the given lengths."""
    n = sum(arrivals.values())
    base = {
        "replica": replica, "t_start": t, "t_end": t + dt, "arrivals": arrivals,
        "finished": dict(arrivals),
        "prompt_tokens": {a: k * prompt for a, k in arrivals.items()},
        "output_tokens": {a: k * output for a, k in arrivals.items()},
        "ttft_ms_sum": 50.0 * n, "latency_ms_sum": 400.0 * n, "failed": 0, "running": 3,
        "waiting": 1, "adapters_held": ("a0", "a1"),
    }
    base.update(kw)
    return TelemetryBatch(**base)


def feed(window: WorkloadWindow, rates: dict[str, dict[str, float]], t0: float, seconds: int,
         seed: int = 0, skip: dict[str, set[int]] | None = None) -> None:
    """``rates[replica][adapter]`` req/s as 1-s Poisson batches over [t0, t0 + seconds);
    ``skip[replica]`` = seconds whose push is lost."""
    rng = np.random.default_rng(seed)
    for s in range(seconds):
        for r, per in rates.items():
            counts = {a: int(rng.poisson(q)) for a, q in per.items()}
            if skip and s in skip.get(r, set()):
                continue
            window.add(batch(r, t0 + s, counts))


# ----------------------------------------------------------------------------- batches


def test_batch_round_trips_and_names_bad_fields():
    b = batch("r0", 10.0, {"a0": 3, "": 1})
    assert TelemetryBatch.from_dict(b.to_dict()) == b
    d = b.to_dict()
    for key, value, field in [
        ("arrivals", {"a0": -1}, "arrivals.a0"),
        ("failed", 1.5, "failed"),
        ("t_end", 5.0, "t_end"),
        ("replica", "", "replica"),
        ("ttft_ms_sum", math.nan, "ttft_ms_sum"),
        ("adapters_held", [1], "adapters_held[0]"),
    ]:
        with pytest.raises(ValueError, match=rf"^{re.escape(field)}:"):
            TelemetryBatch.from_dict({**d, key: value})
    with pytest.raises(ValueError, match="^bogus: unknown field"):
        TelemetryBatch.from_dict({**d, "bogus": 1})
    del d["running"]
    with pytest.raises(ValueError, match="^running: required"):
        TelemetryBatch.from_dict(d)


# ----------------------------------------------------------------------------- estimate


def test_estimate_recovers_poisson_rates_over_two_replicas():
    w = WorkloadWindow(window_s=300)
    rates = {"r0": {"a0": 2.0, "a1": 0.5, "": 0.3}, "r1": {"a0": 1.0, "a2": 0.8, "zz": 0.4}}
    feed(w, rates, t0=1000.0, seconds=300)
    est = w.estimate(1300.0, ranks={"a0": 8, "a1": 16, "a2": 8, "a3": 16}, lengths=FIXED)
    got = {a.id: a.rate_rps for a in est.adapters}
    assert list(got) == ["a0", "a1", "a2", "a3"]  # registered order, silent a3 kept
    for a, true in {"a0": 3.0, "a1": 0.5, "a2": 0.8}.items():
        assert got[a] == pytest.approx(true, abs=4 * math.sqrt(true / 300))
    assert got["a3"] == 0.0
    assert est.base_model_rate_rps == pytest.approx(0.3, abs=4 * math.sqrt(0.3 / 300))
    assert {a.id: a.rank for a in est.adapters}["a1"] == 16
    assert est.duration_s == 3600
    assert set(w.unknown_ids(1300.0, {"a0": 8, "a1": 16, "a2": 8})) == {"zz"}
    # every request finished with 200/80 tokens: the fixed model moves there
    assert (est.lengths.prompt, est.lengths.output) == (200, 80)


def test_lost_pushes_shrink_evidence_not_the_rate():
    w = WorkloadWindow(window_s=300)
    lost = {"r1": {s for s in range(300) if s % 3 == 0}}  # a third of r1's pushes never arrive
    feed(w, {"r0": {"a0": 2.0}, "r1": {"a0": 2.0}}, 0.0, 300, skip=lost)
    rate = w.estimate(300.0, ranks={"a0": 8}, lengths=FIXED).adapters[0].rate_rps
    assert rate == pytest.approx(4.0, abs=4 * math.sqrt(4.0 / 200))


def test_window_slides_and_since_limits_the_span():
    w = WorkloadWindow(window_s=60)
    feed(w, {"r0": {"a0": 5.0}}, 0.0, 60, seed=1)
    feed(w, {"r0": {"a0": 1.0}}, 60.0, 60, seed=2)  # the rate dropped at t = 60
    assert w.estimate(120.0, ranks={"a0": 8}, lengths=FIXED).adapters[0].rate_rps == (
        pytest.approx(1.0, abs=0.6))
    assert all(b.t_end > 60.0 for q in w._batches.values() for b in q)  # old batches dropped
    w2 = WorkloadWindow(window_s=60)
    feed(w2, {"r0": {"a0": 5.0}}, 0.0, 30, seed=3)
    feed(w2, {"r0": {"a0": 1.0}}, 30.0, 30, seed=4)
    whole = w2.estimate(60.0, ranks={"a0": 8}, lengths=FIXED).adapters[0].rate_rps
    recent = w2.estimate(60.0, ranks={"a0": 8}, lengths=FIXED, since=30.0).adapters[0].rate_rps
    assert whole == pytest.approx(3.0, abs=0.8)
    assert recent == pytest.approx(1.0, abs=0.8)


def test_partial_batches_at_the_window_start_count_pro_rata():
    w = WorkloadWindow(window_s=10)
    w.add(batch("r0", -1.0, {"a0": 20}, dt=2.0))  # half of it inside [0, 10]
    for t in range(1, 10):
        w.add(batch("r0", float(t), {"a0": 10}))
    est = w.estimate(10.0, ranks={"a0": 8}, lengths=FIXED)
    assert est.adapters[0].rate_rps == pytest.approx(10.0)
    assert w.coverage(10.0, ["r0"]).fraction["r0"] == pytest.approx(1.0)


def test_duplicate_and_out_of_order_pushes():
    w = WorkloadWindow(window_s=10)
    for t in (0, 1, 3, 2, 2, 4):  # t = 2 re-sent, t = 3 before t = 2
        w.add(batch("r0", float(t), {"a0": 4}))
    assert [b.t_start for b in w._batches["r0"]] == [0, 1, 2, 3, 4]
    assert w.estimate(5.0, ranks={"a0": 8}, lengths=FIXED).adapters[0].rate_rps == 4.0


def test_no_telemetry_is_an_error():
    with pytest.raises(ValueError, match="no telemetry"):
        WorkloadWindow().estimate(100.0, ranks={"a0": 8}, lengths=FIXED)


# ----------------------------------------------------------------------------- lengths


def test_lengths_kept_until_enough_requests_finished():
    w = WorkloadWindow(window_s=60)
    w.add(batch("r0", 0.0, {"a0": MIN_FINISHED_FOR_LENGTHS - 1}))
    assert w.estimate(1.0, ranks={"a0": 8}, lengths=FIXED).lengths == FIXED
    w.add(batch("r0", 1.0, {"a0": 1}))
    assert w.estimate(2.0, ranks={"a0": 8}, lengths=FIXED).lengths.prompt == 200


def test_rescale_lengths_per_kind(tmp_path):
    normal = LengthModel(kind="normal", prompt_mean=100, prompt_std=20, output_mean=50,
                         output_std=10)
    out = rescale_lengths(normal, 200.0, 25.0)
    assert (out.prompt_mean, out.prompt_std) == pytest.approx((200, 40), rel=0.01)
    assert (out.output_mean, out.output_std) == pytest.approx((25, 5), rel=0.01)
    logn = LengthModel(kind="lognormal", prompt_mean=100, prompt_std=50, output_mean=50,
                       output_std=25)
    assert rescale_lengths(logn, 150.0, 50.0).mean_prompt() == pytest.approx(150, rel=0.02)
    share = rescale_lengths(LengthModel(kind="sharegpt"), 180.0, 120.0)
    assert (share.prompt_mean, share.output_mean) == (180.0, 120.0)
    assert share.mean_prompt() == pytest.approx(180.0, rel=1e-3)
    csv = tmp_path / "lengths.csv"
    csv.write_text("prompt_tokens,output_tokens\n10,5\n20,6\n")
    emp = LengthModel(kind="empirical", path=str(csv))
    assert rescale_lengths(emp, 500.0, 500.0) == emp
    # unreachable under the ShareGPT filters (prompts <= 1024): the model is kept
    assert rescale_lengths(LengthModel(kind="sharegpt"), 5000.0, 100.0).prompt_mean is None


# ----------------------------------------------------------------------------- coverage


def test_coverage_complete_when_all_replicas_report():
    w = WorkloadWindow(window_s=60)
    feed(w, {"r0": {"a0": 1.0}, "r1": {"a0": 1.0}}, 0.0, 60)
    cov = w.coverage(60.0, ["r0", "r1"])
    assert cov.complete and cov.why == ""
    assert cov.fraction == pytest.approx({"r0": 1.0, "r1": 1.0})
    assert cov.age_s == pytest.approx({"r0": 0.0, "r1": 0.0})


def test_coverage_incomplete_when_a_replica_stops_reporting():
    w = WorkloadWindow(window_s=60)
    feed(w, {"r0": {"a0": 1.0}}, 0.0, 60)
    feed(w, {"r1": {"a0": 1.0}}, 0.0, 50)  # r1 silent for the last 10 s
    cov = w.coverage(60.0, ["r0", "r1"])
    assert not cov.complete
    assert "r1" in cov.why and "last reported 10.0 s ago" in cov.why and "r0" not in cov.why
    assert not w.coverage(60.0, ["r0", "r2"]).complete
    assert "replica r2 has not reported" in w.coverage(60.0, ["r0", "r2"]).why


def test_coverage_incomplete_when_pushes_are_lost():
    w = WorkloadWindow(window_s=60)
    lost = {"r1": {s for s in range(58) if s % 2}}  # half of r1's pushes lost, but recent ones
    feed(w, {"r0": {"a0": 1.0}, "r1": {"a0": 1.0}}, 0.0, 60, skip=lost)
    cov = w.coverage(60.0, ["r0", "r1"])
    assert not cov.complete and "replica r1 covers" in cov.why
    assert cov.fraction["r1"] == pytest.approx(31 / 60)


def test_coverage_since_a_replan():
    w = WorkloadWindow(window_s=60, min_span_s=10)
    feed(w, {"r0": {"a0": 1.0}}, 0.0, 60)
    feed(w, {"r9": {"a0": 1.0}}, 40.0, 20)  # a replica started by the re-plan at t = 40
    assert not w.coverage(60.0, ["r0", "r9"]).complete
    cov = w.coverage(60.0, ["r0", "r9"], since=40.0)
    assert cov.complete and cov.span_s == 20.0
    early = w.coverage(45.0, ["r0", "r9"], since=40.0)
    assert not early.complete and "only 5.0 s since the plan started" in early.why


def test_window_settings_are_validated():
    for kw, field in [({"window_s": 0}, "window_s"), ({"min_coverage": 1.5}, "min_coverage"),
                      ({"stale_after_s": -1}, "stale_after_s"), ({"min_span_s": 100},
                                                                 "min_span_s")]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            WorkloadWindow(**kw)


# ----------------------------------------------------------------------------- live metrics


def test_live_metrics_of_a_replica():
    w = WorkloadWindow(window_s=10)
    for t in range(10):
        w.add(batch("r0", float(t), {"a0": 3, "a1": 1}, failed=1 if t == 5 else 0,
                    running=t, adapters_held=("a0",) if t == 9 else ("a1",)))
    m = w.live_metrics(10.0, "r0")
    assert m["request_rate_rps"] == pytest.approx(4.0)
    assert m["total_throughput_tps"] == pytest.approx(4 * 280.0)
    assert m["ttft_mean_ms"] == pytest.approx(50.0)
    assert m["latency_mean_ms"] == pytest.approx(400.0)
    assert (m["failed"], m["running"], m["waiting"], m["adapters_held"]) == (1, 9, 1, ("a0",))
    empty = w.live_metrics(10.0, "nobody")
    assert math.isnan(empty["request_rate_rps"]) and empty["covered_s"] == 0.0

