"""The step-time model's feature definitions."""

from __future__ import annotations

import numpy as np
import pytest

from twin.latency import FEATURES, StepTimeModel, cuda_graph_sizes, design_matrix, padding_table


def test_cuda_graph_sizes_follow_vllm_defaults():
    sizes = cuda_graph_sizes(512)
    assert sizes[:5] == [1, 2, 4, 8, 16]
    assert sizes[-1] == 512
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:], strict=False))
    assert cuda_graph_sizes(0) == []


@pytest.mark.parametrize(
    ("tokens", "padded"), [(1, 1), (3, 4), (5, 8), (8, 8), (9, 16), (511, 512)]
)
def test_padding_rounds_up_to_the_next_graph(tokens, padded):
    assert padding_table(512)[tokens] == padded


def test_graph_steps_pay_for_padding_and_eager_steps_for_sequences():
    m = StepTimeModel(const=1.0, graph_decode_tokens=0.5, eager_decode_seqs=0.25, eager_const=7.0,
                      cuda_graph_max_tokens=16)
    small = m.predict_ms(prefill_tokens=0, decode_seqs=5, ctx_tokens=0, lora_adapters=0,
                         lora_enabled=False, max_lora_rank=8, max_loras=1)
    assert small[0] == pytest.approx(1.0 + 0.5 * 8)  # 5 decodes run as an 8-row graph
    big = m.predict_ms(prefill_tokens=0, decode_seqs=20, ctx_tokens=0, lora_adapters=0,
                       lora_enabled=False, max_lora_rank=8, max_loras=1)
    assert big[0] == pytest.approx(1.0 + 7.0 + 0.25 * 20)


def test_lora_terms_follow_the_kernel_grid():
    m = StepTimeModel(lora_const=2.0, lora_adapters=0.5, lora_adapter_rank_tiles=0.25,
                      lora_ktokens=10.0, lora_slot_mtokens=4.0, cuda_graph_max_tokens=0)
    kw = dict(prefill_tokens=1000, decode_seqs=0, ctx_tokens=0, lora_adapters=4)
    off = m.predict_ms(lora_enabled=False, max_lora_rank=8, max_loras=7, **kw)[0]
    r8 = m.predict_ms(lora_enabled=True, max_lora_rank=8, max_loras=7, **kw)[0]
    r32 = m.predict_ms(lora_enabled=True, max_lora_rank=32, max_loras=7, **kw)[0]
    g63 = m.predict_ms(lora_enabled=True, max_lora_rank=8, max_loras=63, **kw)[0]
    assert off == 0.0
    assert r8 == pytest.approx(2.0 + 0.5 * 4 + 10.0 + 4.0 * 1000 * 8 / 1e6)
    # token work grows with the rank tiles (cdiv(32, 16) = 2 vs 1); each adapter adds one tile's
    # blocks per extra tile on top of its own
    assert r32 - r8 == pytest.approx(10.0 + 0.25 * 4)
    r16 = m.predict_ms(lora_enabled=True, max_lora_rank=16, max_loras=7, **kw)[0]
    assert r16 == pytest.approx(r8)
    assert g63 - r8 == pytest.approx(4.0 * 1000 * 56 / 1e6)  # launched blocks with max_loras


def test_design_matrix_has_one_column_per_feature():
    x = design_matrix(prefill_tokens=np.array([0, 100]), decode_seqs=np.array([3, 0]),
                      ctx_tokens=np.array([10, 50]), lora_adapters=1, lora_enabled=1,
                      max_lora_rank=16, max_loras=4)
    assert x.shape == (2, len(FEATURES))


def test_model_round_trips_and_rejects_unknown_coefficients():
    m = StepTimeModel(const=3.0, ctx_ktokens=0.1, cuda_graph_max_tokens=256)
    assert StepTimeModel.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="unknown coefficient"):
        StepTimeModel.from_dict({"const": 1.0, "decode_tokenz": 2.0})
    with pytest.raises(ValueError, match="step_model.const"):
        StepTimeModel(const=float("nan"))


@pytest.mark.parametrize("graph_max", [0, 512])
@pytest.mark.parametrize("lora", [False, True])
def test_the_engines_scalar_step_time_is_predict_ms(graph_max, lora):
    """``StepCost.ms`` (what the engines call per step) equals ``predict_ms`` on random batches
    of every regime: graph and eager steps, small and large shrink launches, ranks 8-64."""
    from twin.engine.step_time import step_ms
    from twin.latency import StepCost

    rng = np.random.default_rng(graph_max + lora)
    model = StepTimeModel.from_vector(rng.uniform(0.001, 2.0, len(FEATURES)),
                                      cuda_graph_max_tokens=graph_max)
    for rank in (8, 16, 32, 64):
        slots = int(rng.integers(1, 64))
        cost = StepCost.for_engine(model, lora_enabled=lora, max_lora_rank=rank, max_loras=slots)
        p = rng.integers(0, 3000, 300)
        d = rng.integers(0, 600, 300)
        d[p + d == 0] = 1
        k = rng.integers(0, 200_000, 300)
        a = rng.integers(0, slots + 1, 300)
        want = model.predict_ms(prefill_tokens=p, decode_seqs=d, ctx_tokens=k, lora_adapters=a,
                                lora_enabled=lora, max_lora_rank=rank, max_loras=slots)
        got = [cost.ms(int(pi), int(di), int(ki), int(ai)) for pi, di, ki, ai in
               zip(p, d, k, a, strict=True)]
        np.testing.assert_allclose(got, want, rtol=1e-12)
        # the compiled twin the engine calls gives the very same float
        coef, pad = cost.coefficients()
        loads = rng.uniform(0, 50, 300)
        scanned = rng.integers(0, 1000, 300)
        compiled = [step_ms(coef, pad, int(pi), int(di), int(ki), int(ai), float(li), int(si))
                    for pi, di, ki, ai, li, si in zip(p, d, k, a, loads, scanned, strict=True)]
        assert compiled == [cost.ms(int(pi), int(di), int(ki), int(ai), float(li), int(si))
                            for pi, di, ki, ai, li, si in zip(p, d, k, a, loads, scanned,
                                                              strict=True)]
    scan = StepCost.for_engine(model, lora_enabled=lora, max_lora_rank=8, max_loras=4,
                               scan_us_per_waiting=3.0)
    assert scan.ms(10, 5, 100, 1, load_ms=7.0, scanned_left=1000) == pytest.approx(
        scan.ms(10, 5, 100, 1) + 7.0 + 3.0)
