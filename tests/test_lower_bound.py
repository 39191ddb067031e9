"""placement.lower_bound: the bound printed with every plan is one by construction (the step
model's roofline), checked by hand on a hand profile and against what the twin accepts."""

from __future__ import annotations

import math
from functools import partial

import pytest
from conftest import make_profile

from placement.audit import audit_plan
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.lower_bound import SAMPLE_MARGIN, STARVED_BELOW, compute_lower_bound
from placement.predictors import make_predictor
from placement.verify import verify_plans
from twin.lengths import LengthModel
from twin.profile import load_profile
from twin.workload import few_hot_workload, uniform_workload, zipf_workload

FIXED = LengthModel(kind="fixed", prompt=100, output=11)  # 100 prompt + 10 decode tokens


def test_the_bound_is_the_roofline_worked_by_hand() -> None:
    """Every step 10 ms + 0.01 ms per prompt token + 0.1 ms per decode row, nothing else.
    2,000 identical requests/s of 100 + 10 tokens: 1 ms of prefill and 1 ms of decode each;
    a starvation-free fleet serves at least 90 % of them; steps hold at most 2,048 tokens."""
    profile = make_profile(const_ms=10.0, prefill_ms_per_token=0.01, decode_ms_per_seq=0.1)
    ctx = PlacementContext.for_profile(profile, make_predictor("analytic", profile),
                                       max_num_seqs=256, max_num_batched_tokens=2048)
    bound = compute_lower_bound(uniform_workload(10, 2000.0, ranks=[8], lengths=FIXED), ctx)
    served = 2000.0 * STARVED_BELOW * SAMPLE_MARGIN  # requests/s a fleet must at least finish
    assert bound.terms["prefill"] == pytest.approx(served * 1.0, rel=1e-6)
    assert bound.terms["decode"] == pytest.approx(served * 1.0, rel=1e-6)
    # steps/s >= tokens/s / budget (> decodes/s / max_num_seqs here), 10 ms each
    assert bound.terms["steps"] == pytest.approx(served * 110 / 2048 * 10.0, rel=1e-6)
    assert bound.busy_ms_per_s == pytest.approx(served * (2.0 + 1100 / 2048), rel=1e-6)
    assert bound.replicas == math.ceil(served * (2.0 + 1100 / 2048) / 1000) == 5


def test_a_negative_step_coefficient_is_refused() -> None:
    profile = make_profile(const_ms=-1.0)
    ctx = PlacementContext.for_profile(profile, make_predictor("analytic", profile))
    with pytest.raises(PlacementError, match="negative"):
        compute_lower_bound(uniform_workload(2, 1.0, ranks=[8], lengths=FIXED), ctx)


@pytest.mark.parametrize("make", [
    lambda: uniform_workload(6, 12.0, ranks=[8], lengths=LengthModel(kind="fixed", prompt=40,
                                                                    output=8)),
    lambda: zipf_workload(20, 30.0, ranks=[8, 16], seed=1,
                          lengths=LengthModel(kind="lognormal", prompt_mean=120.0,
                                              prompt_std=60.0, output_mean=40.0,
                                              output_std=20.0, max_total=480)),
    lambda: few_hot_workload(12, 60.0, n_hot=2, hot_share=0.7, ranks=[8], seed=2,
                             lengths=LengthModel(kind="fixed", prompt=200, output=100)),
])
def test_the_bound_never_exceeds_what_the_twin_accepts(make) -> None:
    """Light to several replicas' worth on the tiny CPU profile: the audit's search of the
    fewest replicas the twin accepts (the lorafleet packing at fewer replicas, each verified)
    never goes below the printed bound."""
    tiny = load_profile("tiny-llama-cpu")
    ctx = PlacementContext.for_profile(tiny, make_predictor("analytic", tiny))
    verify = partial(verify_plans, profile=tiny, duration_s=120.0, workers=1)
    result = audit_plan(make(), ctx, verify)
    assert 1 <= result.lower_bound <= result.twin_min <= max(result.replicas, result.twin_min)
    assert not result.bound_violation
    assert result.starved == 0  # lorafleet plan's answer is verified and fed
