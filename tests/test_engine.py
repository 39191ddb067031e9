"""The engine's vLLM V1 rules, one small hand-checkable scenario each, plus an exact equivalence
check against a naive step-by-step reference on random workloads."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_profile
from reference_engine import naive_run

from twin.config import EngineConfig
from twin.engine import run_engine
from twin.profile import InfeasibleConfigError


def run(reqs, config, profile, duration=1000.0, ranks=None):
    """reqs: list of (arrival_s, adapter, prompt, output)."""
    a = np.array([r[0] for r in reqs], dtype=float)
    ad = np.array([r[1] for r in reqs], dtype=np.int32)
    p = np.array([r[2] for r in reqs], dtype=np.int32)
    o = np.array([r[3] for r in reqs], dtype=np.int32)
    n_adapters = max([int(x) for x in ad] + [-1]) + 1
    return run_engine(a, ad, p, o, ranks or [8] * n_adapters, config, profile, duration)


CFG = EngineConfig(max_loras=4, max_num_seqs=8, max_num_batched_tokens=64)


def test_single_request_prefill_then_decode(hand_profile):
    # prompt fits one chunk: step 1 prefills and samples token 1, steps 2..5 decode tokens 2..5
    r = run([(0.0, 0, 10, 5)], CFG, hand_profile)
    assert r.first_token_s[0] == pytest.approx(0.010)
    assert r.finish_s[0] == pytest.approx(0.050)
    assert r.engine_steps == 5


def test_chunked_prefill_splits_long_prompt_by_token_budget(hand_profile):
    cfg = EngineConfig(max_loras=1, max_num_seqs=16, max_num_batched_tokens=16)
    r = run([(0.0, 0, 40, 2)], cfg, hand_profile)
    # chunks of 16, 16, 8 tokens: the first token comes with the third step
    assert r.first_token_s[0] == pytest.approx(0.030)
    assert r.finish_s[0] == pytest.approx(0.040)


def test_decodes_take_budget_before_waiting_prefills(hand_profile):
    cfg = EngineConfig(max_loras=1, max_num_seqs=4, max_num_batched_tokens=16)
    # A decodes from step 2 on; B (15-token prompt) arrives then and has 15 tokens of budget
    # left after A's decode token, so it prefills in one step
    r = run([(0.0, 0, 8, 10), (0.005, 0, 15, 2)], cfg, hand_profile)
    assert r.first_token_s[1] == pytest.approx(0.020)
    # a 16-token prompt would need 17 tokens of budget with A decoding: two chunks
    r = run([(0.0, 0, 8, 10), (0.005, 0, 16, 2)], cfg, hand_profile)
    assert r.first_token_s[1] == pytest.approx(0.030)


def test_max_num_seqs_caps_running_requests(hand_profile):
    cfg = EngineConfig(max_loras=1, max_num_seqs=2, max_num_batched_tokens=64)
    r = run([(0.0, 0, 4, 3), (0.0, 0, 4, 3), (0.0, 0, 4, 3)], cfg, hand_profile)
    assert list(r.first_token_s[:2]) == pytest.approx([0.010, 0.010])
    # the third waits until the first two finish after step 3, then prefills in step 4
    assert r.first_token_s[2] == pytest.approx(0.040)


def test_max_loras_skips_other_adapters_but_keeps_scanning(hand_profile):
    cfg = EngineConfig(max_loras=1, max_num_seqs=8, max_num_batched_tokens=64)
    # queue order: A(adapter 0), B(adapter 1), C(adapter 0)
    r = run([(0.0, 0, 4, 3), (0.0, 1, 4, 3), (0.0, 0, 4, 3)], cfg, hand_profile)
    assert r.first_token_s[0] == pytest.approx(0.010)
    assert r.first_token_s[2] == pytest.approx(0.010)  # C was admitted past the skipped B
    assert r.first_token_s[1] == pytest.approx(0.040)  # B only once adapter 0 left the batch


def test_skipped_waiting_requests_cost_scheduler_time():
    # 1 ms per skipped request: adapter 0 holds the only slot for 4 steps while the 3 requests
    # of adapter 1 behind it are walked past in every one of them
    prof = make_profile(scan_us_per_waiting=1000.0)
    cfg = EngineConfig(max_loras=1, max_num_seqs=8, max_num_batched_tokens=64)
    reqs = [(0.0, 0, 4, 4)] + [(0.0, 1, 4, 2)] * 3
    r = run_engine(
        np.array([q[0] for q in reqs]), np.array([q[1] for q in reqs], np.int32),
        np.array([q[2] for q in reqs], np.int32), np.array([q[3] for q in reqs], np.int32),
        [8, 8], cfg, prof, 1000.0, record_trace=True,
    )
    tr = r.trace.to_arrays()
    assert tr["scanned"][:4].tolist() == [4, 3, 3, 3]  # the queue, then the three skipped ones
    assert tr["step_ms"][:4].tolist() == pytest.approx([13.0, 13.0, 13.0, 13.0])
    # adapter 1's three requests are then admitted together: nothing skipped, no scan cost
    assert tr["admitted"][4] == 3 and tr["step_ms"][4] == pytest.approx(10.0)


def test_fcfs_admission_without_skips_costs_no_scan_time():
    prof = make_profile(scan_us_per_waiting=1000.0)
    cfg = EngineConfig(max_loras=4, max_num_seqs=8, max_num_batched_tokens=8)
    # budget 8 tokens: one 8-token prompt per step, the rest stay queued but are never examined
    r = run([(0.0, i % 2, 8, 1) for i in range(4)], cfg, prof)
    assert np.diff(np.sort(r.finish_s)).tolist() == pytest.approx([0.010] * 3)


def test_base_model_requests_are_never_skipped_by_the_lora_rule(hand_profile):
    cfg = EngineConfig(max_loras=1, max_num_seqs=8, max_num_batched_tokens=64)
    r = run([(0.0, 0, 4, 3), (0.0, 1, 4, 3), (0.0, -1, 4, 3)], cfg, hand_profile)
    assert r.first_token_s[2] == pytest.approx(0.010)
    assert r.first_token_s[1] == pytest.approx(0.040)


def test_kv_exhaustion_preempts_newest_running_request():
    # 4 blocks of 16 tokens; each request needs 3 blocks at its end: both cannot finish together
    prof = make_profile(kv_tokens=64, max_model_len=64)
    cfg = EngineConfig(max_loras=1, max_num_seqs=8, max_num_batched_tokens=64)
    r = run([(0.0, 0, 16, 30), (0.0, 0, 16, 30)], cfg, prof)
    assert r.preemptions[0] == 0
    assert r.preemptions[1] >= 1
    assert np.all(np.isfinite(r.finish_s))
    assert r.finish_s[0] < r.finish_s[1]
    # the preempted request resumes after the first one frees its blocks, recomputing its tokens
    assert r.finish_s[1] > r.finish_s[0] + 0.010 * 10


def test_preemption_recomputes_prompt_and_generated_tokens():
    # the survivor's prefill time shows how many tokens the resumed request recomputes
    prof = make_profile(kv_tokens=64, max_model_len=64, prefill_ms_per_token=1.0)
    cfg = EngineConfig(max_loras=1, max_num_seqs=8, max_num_batched_tokens=64)
    r = run([(0.0, 0, 16, 30), (0.0, 0, 16, 30)], cfg, prof)
    assert r.preemptions[1] == 1
    # the largest step is the resume prefill: prompt 16 + tokens generated before preemption
    gaps = r.preempt_gap_ms
    assert len(gaps) == 1 and gaps[0] > 10.0


def test_preallocation_takes_blocks_early():
    # 21 blocks (20 usable): five 4-block requests fit without preallocation; with 0.8.4-style
    # preallocation (1 + 4 blocks per allocation) the first four take all blocks at admission
    cfg = EngineConfig(max_loras=1, max_num_seqs=8, max_num_batched_tokens=128)
    reqs = [(0.0, 0, 16, 40)] * 5
    lazy = run(reqs, cfg, make_profile(kv_tokens=336, max_model_len=128, preallocate_blocks=0))
    eager = run(reqs, cfg, make_profile(kv_tokens=336, max_model_len=128, preallocate_blocks=4))
    assert lazy.first_token_s.tolist() == pytest.approx([0.010] * 5)
    assert eager.first_token_s[:4].tolist() == pytest.approx([0.010] * 4)
    assert eager.first_token_s[4] == pytest.approx(0.410)  # after the first four finish


def test_whole_prompt_admission_check_waits_instead_of_preempting():
    # newer vLLM admits only if the whole prompt fits; 0.8.5 admits on the first chunk
    # 6 usable blocks. A takes 2; B's 80-token prompt needs 5. 0.8.5 admits B's first chunk,
    # then A's next block starves B's second chunk and B preempts itself; 0.32 keeps B waiting.
    cfg = EngineConfig(max_loras=1, max_num_seqs=8, max_num_batched_tokens=48)
    reqs = [(0.0, 0, 32, 3), (0.0, 0, 80, 1)]
    kw = dict(kv_tokens=112, max_model_len=98)
    old = run(reqs, cfg, make_profile(**kw))
    new = run(reqs, cfg, make_profile(admit_only_if_prompt_fits=True, **kw))
    assert old.preemptions.tolist() == [0, 1]
    assert new.preemptions.tolist() == [0, 0]
    # old: B re-admitted with a 47-token chunk in step 3, done in step 4; new: B waits for A to
    # finish (step 3), then needs two chunks (48 + 32) in steps 4 and 5
    assert old.first_token_s[1] == pytest.approx(0.040)
    assert new.first_token_s[1] == pytest.approx(0.050)


def test_adapter_loads_cost_time_and_follow_lru():
    prof = make_profile(gpu_load_ms=5.0, disk_load_ms=50.0)
    cfg = EngineConfig(max_loras=1, max_cpu_loras=2, max_num_seqs=8, max_num_batched_tokens=64)
    # adapters 0, 1, 0 one after another: 3 GPU activations (one slot); CPU holds 2 (preloaded)
    r = run([(0.0, 0, 4, 1), (1.0, 1, 4, 1), (2.0, 0, 4, 1)], cfg, prof)
    assert r.gpu_loads == 3 and r.disk_loads == 0
    assert r.first_token_s[0] == pytest.approx(0.015)  # 10 ms step + 5 ms activation
    # adapter 2 was not preloaded (CPU cache of 2): disk load + activation
    r = run([(0.0, 2, 4, 1)], cfg, prof, ranks=[8, 8, 8])
    assert r.disk_loads == 1
    assert r.first_token_s[0] == pytest.approx(0.065)


def test_full_slots_cascade_reloads_like_vllm():
    # vLLM walks the step's adapters in hash order (4, 1, 3, 0, 5, 2 here) and evicts the LRU
    # slot even if its adapter is in the current batch. Two slots hold {1, 0}; adapter 0 leaves
    # and 4 joins in the next step: 4 evicts 1 (the older of the two by hash), then 1 is
    # reloaded, evicting 0: two loads in that step, not one.
    prof = make_profile(gpu_load_ms=5.0)
    cfg = EngineConfig(max_loras=2, max_cpu_loras=6, max_num_seqs=8, max_num_batched_tokens=64)
    reqs = [(0.0, 1, 4, 20), (0.0, 0, 4, 2), (0.025, 4, 4, 2)]
    r = run(reqs, cfg, prof, ranks=[8] * 6)
    assert r.first_token_s[0] == pytest.approx(0.020)  # 10 ms step + two first loads
    assert r.finish_s[1] == pytest.approx(0.030)
    assert r.first_token_s[2] == pytest.approx(0.050)  # 10 ms step + the 2-load cascade
    assert r.gpu_loads == 4


def test_resident_adapter_is_not_reloaded(hand_profile):
    prof = make_profile(gpu_load_ms=5.0)
    cfg = EngineConfig(max_loras=2, max_num_seqs=8, max_num_batched_tokens=64)
    r = run([(0.0, 0, 4, 1), (1.0, 0, 4, 1)], cfg, prof)
    assert r.gpu_loads == 1
    assert r.first_token_s[1] - 1.0 == pytest.approx(0.010)


def test_requests_longer_than_max_model_len_are_rejected():
    prof = make_profile(max_model_len=32)
    r = run([(0.0, 0, 30, 5), (0.0, 0, 10, 5)], CFG, prof)
    assert r.rejected.tolist() == [True, False]
    assert np.isnan(r.finish_s[0]) and np.isfinite(r.finish_s[1])


def test_idle_time_is_skipped_not_stepped(hand_profile):
    r = run([(0.0, 0, 4, 2), (500.0, 0, 4, 2)], CFG, hand_profile)
    assert r.engine_steps == 4
    assert r.first_token_s[1] == pytest.approx(500.010)


def test_window_end_stops_the_run(hand_profile):
    r = run([(0.0, 0, 4, 1000)], CFG, hand_profile, duration=1.0)
    assert np.isnan(r.finish_s[0])
    assert r.engine_steps == pytest.approx(100, abs=1)


def test_infeasible_kv_config_is_an_error_saying_what_fits():
    prof = make_profile(kv_tokens=1000, max_model_len=4096)
    with pytest.raises(InfeasibleConfigError, match="What fits"):
        run([(0.0, 0, 4, 2)], CFG, prof)


def _random_workload(seed: int, n: int, n_adapters: int, max_len: int):
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.exponential(0.02, n).cumsum())
    adapter = rng.integers(-1, n_adapters, n)
    prompt = rng.integers(1, max_len // 2, n)
    output = rng.integers(1, max_len // 2 - 80, n)
    return arrival, adapter.astype(np.int32), prompt.astype(np.int32), output.astype(np.int32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prealloc", [0, 4])
def test_fast_engine_matches_naive_reference(seed, prealloc):
    """Every request's first-token and finish time agree with the O(batch) reference."""
    arrival, adapter, prompt, output = _random_workload(seed, 300, 6, 512)
    prof = make_profile(
        admit_only_if_prompt_fits=seed % 2 == 1, kv_tokens=2048 + 512 * seed, max_model_len=512,
        const_ms=5.0, prefill_ms_per_token=0.05,
        decode_ms_per_seq=0.2, ctx_ms_per_ktoken=1.0, lora_adapter_ms=0.5,
        preallocate_blocks=prealloc, graph_max_tokens=64 * (seed % 3), graph_ms_per_token=0.15,
        eager_ms=2.0, lora_ms_per_ktoken=3.0, gpu_load_ms=3.0, disk_load_ms=20.0,
    )
    cfg = EngineConfig(
        max_loras=1 + seed % 3, max_cpu_loras=4 + seed % 3, max_num_seqs=6 + 4 * seed,
        max_lora_rank=16,
        max_num_batched_tokens=64 + 32 * seed,
    )
    fast = run_engine(arrival, adapter, prompt, output, [8] * 6, cfg, prof, 60.0)
    ref = naive_run(arrival, adapter, prompt, output, cfg, prof, 60.0, [8] * 6)
    assert fast.preemptions.sum() > 0 or seed < 2  # the larger caches may avoid preemption
    np.testing.assert_array_equal(fast.preemptions, ref["preemptions"])
    assert fast.gpu_loads == int(ref["gpu_loads"]) and fast.disk_loads == int(ref["disk_loads"])
    assert fast.gpu_loads > 0
    np.testing.assert_allclose(fast.first_token_s, ref["first_token_s"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(fast.finish_s, ref["finish_s"], rtol=0, atol=1e-9)
    assert fast.engine_steps == int(ref["steps"])


def test_engine_is_deterministic(hand_profile):
    arrival, adapter, prompt, output = _random_workload(7, 200, 4, 512)
    prof = make_profile(kv_tokens=4096, max_model_len=512, decode_ms_per_seq=0.3)
    a = run_engine(arrival, adapter, prompt, output, [8] * 4, CFG, prof, 30.0)
    b = run_engine(arrival, adapter, prompt, output, [8] * 4, CFG, prof, 30.0)
    np.testing.assert_array_equal(a.finish_s, b.finish_s)
    np.testing.assert_array_equal(a.itl_gap_ms, b.itl_gap_ms)


def test_client_cap_fails_requests_beyond_the_in_flight_limit(hand_profile):
    cfg = EngineConfig(max_loras=1, max_num_seqs=1, max_num_batched_tokens=64)
    reqs = [(0.0, 0, 4, 3), (0.0, 0, 4, 3), (0.0, 0, 4, 3), (0.1, 0, 4, 3)]
    a = np.array([r[0] for r in reqs])
    ad = np.zeros(4, np.int32)
    p = np.full(4, 4, np.int32)
    o = np.full(4, 3, np.int32)
    r = run_engine(a, ad, p, o, [8], cfg, hand_profile, 10.0, client_max_inflight=2)
    # two in flight at t=0 (one running, one waiting): the third fails; by t=0.1 all is done
    assert r.dropped.tolist() == [False, False, True, False]
    assert np.isnan(r.finish_s[2]) and np.isfinite(r.finish_s[[0, 1, 3]]).all()
    assert r.first_token_s[1] == pytest.approx(0.040)
    unbounded = run_engine(a, ad, p, o, [8], cfg, hand_profile, 10.0)
    assert not unbounded.dropped.any() and np.isfinite(unbounded.finish_s).all()


def test_client_cap_keeps_later_requests_of_in_set_adapters_reachable(hand_profile):
    # one slot, adapter 0 in the set. Adapter 0's next request (3) is dropped at the client
    # (3 in flight); the one after it (4) arrives once the base-model request freed room and
    # must still be found while the set is full, long before adapter 1's turn.
    cfg = EngineConfig(max_loras=1, max_num_seqs=4, max_num_batched_tokens=64)
    reqs = [(0.0, 0, 4, 50), (0.0, -1, 4, 2), (0.0, 1, 4, 2), (0.01, 0, 4, 2), (0.095, 0, 4, 2)]
    a = np.array([r[0] for r in reqs])
    ad = np.array([r[1] for r in reqs], np.int32)
    p = np.full(5, 4, np.int32)
    o = np.array([r[3] for r in reqs], np.int32)
    r = run_engine(a, ad, p, o, [8, 8], cfg, hand_profile, 10.0, client_max_inflight=3)
    assert r.dropped.tolist() == [False, False, False, True, False]
    assert r.first_token_s[4] == pytest.approx(0.11)
    assert r.first_token_s[2] > r.finish_s[0]


def test_client_cap_fuzz_matches_an_unbounded_client_on_the_surviving_requests():
    """Dropping requests at the client must leave the engine's bookkeeping intact: replaying
    only the surviving requests without a cap gives the same timings."""
    arrival, adapter, prompt, output = _random_workload(11, 400, 5, 512)
    prof = make_profile(kv_tokens=3000, max_model_len=512, decode_ms_per_seq=0.2,
                        lora_adapter_ms=0.3)
    cfg = EngineConfig(max_loras=2, max_cpu_loras=5, max_num_seqs=12, max_num_batched_tokens=96)
    capped = run_engine(arrival, adapter, prompt, output, [8] * 5, cfg, prof, 60.0,
                        client_max_inflight=15)
    assert capped.dropped.sum() > 20
    keep = ~capped.dropped
    plain = run_engine(arrival[keep], adapter[keep], prompt[keep], output[keep], [8] * 5, cfg,
                       prof, 60.0)
    np.testing.assert_allclose(capped.first_token_s[keep], plain.first_token_s, atol=1e-9)
    np.testing.assert_allclose(capped.finish_s[keep], plain.finish_s, atol=1e-9)
