"""placement.audit: the plan audit's workload generator (seeded, diverse, valid) and summary;
its checker runs in tests/test_lower_bound.py against the twin."""

from __future__ import annotations

import numpy as np
import pytest

from placement.audit import AuditResult, audit_workloads, summary
from placement.context import PlacementContext
from placement.predictors import make_predictor
from twin.profile import load_profile


@pytest.fixture(scope="module")
def llama_ctx() -> PlacementContext:
    profile = load_profile("llama-3.1-8b-instruct")
    return PlacementContext.for_profile(profile, make_predictor("analytic", profile))


def test_the_generator_is_seeded_and_diverse(llama_ctx) -> None:
    first = audit_workloads(64, llama_ctx, seed=0)
    again = audit_workloads(64, llama_ctx, seed=0)
    other = audit_workloads(64, llama_ctx, seed=1)
    key = [(w.name, w.total_rate_rps, w.lengths.to_dict()) for w in first]
    assert key == [(w.name, w.total_rate_rps, w.lengths.to_dict()) for w in again]
    assert key != [(w.name, w.total_rate_rps, w.lengths.to_dict()) for w in other]
    prompts = np.array([w.lengths.mean_prompt() for w in first])
    outputs = np.array([w.lengths.mean_output() for w in first])
    adapters = np.array([len(w.adapters) for w in first])
    rates = np.array([w.total_rate_rps for w in first])
    # lengths from a few tokens to thousands, 1 to ~2,000 adapters, rates over decades
    assert prompts.min() < 20 and prompts.max() > 1000
    assert outputs.min() < 10 and outputs.max() > 500
    assert adapters.min() <= 3 and adapters.max() >= 1000
    assert rates.max() / rates.min() > 1000
    assert {w.name.split("-")[2] for w in first} == {"uniform", "zipf", "few_hot"}
    assert {a.rank for w in first for a in w.adapters} == {8, 16, 32, 64}
    per_adapter = [a.rate_rps for w in first for a in w.adapters if a.rate_rps > 0]
    assert min(per_adapter) < 0.01
    with pytest.raises(ValueError, match="n: must be >= 1"):
        audit_workloads(0, llama_ctx)


def test_summary_counts_what_the_targets_name() -> None:
    def result(name: str, replicas: int, twin_min: int, bound: int, starved: int = 0,
               n: int = 10, plan_s: float = 0.1) -> AuditResult:
        return AuditResult(name, n, 1.0, 100.0, 50.0, replicas, starved, twin_min, bound,
                           plan_s, 2)

    rows = [result("a", 4, 4, 2), result("b", 5, 4, 5, starved=1, n=1000, plan_s=1.5),
            result("c", 1, 1, 1, n=1200, plan_s=0.7)]
    s = summary(rows)
    assert s["n"] == 3 and s["worst_ratio"] == 1.25 and s["worst"][0] == "b"
    assert s["mean_ratio"] == pytest.approx((1 + 1.25 + 1) / 3, abs=1e-4)
    assert s["starved_plans"] == 1 and s["plans_over_twin_min"] == 1
    assert s["bound_violations"] == 1  # b's bound of 5 exceeds the twin's 4
    assert s["max_plan_s_1000_adapters"] == 1.5
