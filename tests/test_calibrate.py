"""Calibration from the bundled reference measurements (data/reference, H100 + vLLM 0.8.5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twin.calibrate import (
    CalibrationError,
    calibrate_reference,
    fit_adapter_loads,
    fit_kv_capacity,
    fit_scan_cost,
    load_reference,
    smape,
    unidentifiable_features,
)
from twin.step_features import replay_logged_tokens, simulated_steps

DATA = Path(__file__).resolve().parent.parent / "data" / "reference" / "vllm-0.8.5-h100"
LLAMA = "llama-3.1-8b-instruct"


@pytest.fixture(scope="module")
def llama_ref():
    return load_reference(DATA, LLAMA)


def test_smape_is_the_standard_definition():
    assert smape(np.array([100.0]), np.array([100.0])) == 0.0
    assert smape(np.array([100.0]), np.array([50.0])) == pytest.approx(200 * 50 / 150)
    assert smape(np.array([1.0, 3.0]), np.array([3.0, 1.0])) == pytest.approx(100.0)


def test_replay_splits_logged_tokens_into_prefill_and_decode():
    # prompts of 5 tokens, 3 output tokens: 2 prompts (10), then their decodes plus a third
    # prompt (2 + 5), then decodes (3), ...
    rows, bad = replay_logged_tokens(np.array([10, 7, 3, 1]), 5, 3, max_seqs=4)
    assert bad == 0
    p, d, k, admitted, finished, scanned = rows.T
    assert np.isnan(scanned).all()  # a token log does not tell how much of the queue was walked
    assert p.tolist() == [10, 5, 0, 0]
    assert d.tolist() == [0, 2, 3, 1]
    assert admitted.tolist() == [2, 1, 0, 0]
    assert finished.tolist() == [0, 0, 2, 1]
    assert k[1] == 6 + 6 + 5  # two decodes at context 6 and a 5-token prefill
    # a logged total the running requests cannot explain is flagged
    _, bad = replay_logged_tokens(np.array([10, 1]), 5, 3, max_seqs=4)
    assert bad == 1


def test_simulated_decode_sweep_runs_full_waves():
    rows = simulated_steps(prompt_len=5, output_len=100, n_prompts=400, max_seqs=100,
                           one_adapter_each=False)
    decode = rows[:, 1]
    assert decode.max() == 100
    assert rows[:, 3].sum() == 400 and rows[:, 4].sum() == 400  # all admitted and finished
    # between admissions the batch is the full wave
    assert np.median(decode) == 100


def test_kv_law_matches_the_probes_within_5_percent(llama_ref):
    kv = fit_kv_capacity(llama_ref.kv, llama_ref.runs)
    ok = llama_ref.kv[llama_ref.kv["status"] == "ok"]
    law = kv.base_tokens - ok["max_loras"] * (
        kv.per_slot_tokens + kv.per_slot_rank_tokens * ok["max_lora_rank"]
    )
    err = np.abs(law - ok["kv_cache_tokens"]) / ok["kv_cache_tokens"]
    assert err.max() < 0.05


def test_load_table_keeps_the_slot_padding_effect(llama_ref):
    loads = fit_adapter_loads(llama_ref.loads)
    # a rank-8 adapter in a rank-32 slot activates slower than a rank-32 one (README)
    assert loads.gpu_load_ms(32, 8) > loads.gpu_load_ms(32, 32)
    assert loads.disk_load_ms(32) > loads.disk_load_ms(8)


def test_calibration_fits_held_out_steps(tmp_path):
    profile, report = calibrate_reference(DATA, LLAMA)
    assert report["held_out"]["steps"] > 10_000
    # the parametric model must predict steps of runs it never saw within a few percent
    assert report["held_out"]["smape_pct"] < 3.0
    for row in report["held_out_by_sweep"]:
        assert row["smape_pct"] < 5.0, row
    # LoRA steps were measured at max_loras 300 (decode sweeps) and 1 (loading runs): both the
    # per-token and the per-slot terms are identifiable, and the 300-slot sweeps show the slots
    assert report["fixed_at_zero"] == {}
    assert profile.step_model.lora_slot_mtokens > 0
    path = tmp_path / "p.yaml"
    profile.to_yaml(path)
    assert path.read_text().startswith("format_version: 1")


def test_calibration_errors_name_the_problem(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        load_reference(tmp_path / "nope", LLAMA)
    with pytest.raises(CalibrationError, match="missing"):
        load_reference(tmp_path, LLAMA)
    with pytest.raises(CalibrationError, match="no rows for model 'gpt-9'"):
        load_reference(DATA, "gpt-9")


def _scan_steps(skip_us: float, runs: int = 4, steps: int = 200, vary: bool = True):
    rng = np.random.default_rng(1)
    frames = []
    for r in range(runs):
        skipped = rng.integers(0, 60, steps) if vary else np.full(steps, 30)
        decode = rng.integers(0, 3, steps)
        admitted = rng.integers(0, 2, steps)
        sched = 0.02 + 0.01 * r + 2e-3 * decode + 5e-3 * admitted + skip_us * 1e-3 * skipped
        frames.append(pd.DataFrame({
            "run": f"r{r}", "decode_seqs": decode, "admitted": admitted,
            "scanned": skipped + admitted, "scheduler_ms": sched + rng.normal(0, 1e-4, steps),
        }))
    return pd.concat(frames, ignore_index=True)


def test_scan_cost_is_recovered_from_scheduler_time_despite_run_offsets():
    us, report = fit_scan_cost(_scan_steps(0.3))
    assert us == pytest.approx(0.3, rel=0.05)
    assert report["runs"] == 4


def test_scan_cost_without_skip_variation_is_reported_unidentifiable():
    us, report = fit_scan_cost(_scan_steps(0.3, vary=False))
    assert us is None and "skipped" in report["why"]
    us, report = fit_scan_cost(pd.DataFrame({"run": ["a"], "step_ms": [1.0]}))
    assert us is None and "scheduler_ms" in report["why"]


def test_rank_tile_cost_needs_lora_steps_at_two_tile_counts():
    f = pd.DataFrame({
        "prefill_tokens": [100, 0], "decode_seqs": [0, 5], "lora_enabled": [1, 1],
        "max_loras": [1, 2], "lora_adapters": [2, 1], "max_lora_rank": [8, 16],
    })
    assert "lora_adapter_rank_tiles" in unidentifiable_features(f)  # ranks 8 and 16: one tile
    f["max_lora_rank"] = [8, 32]
    assert "lora_adapter_rank_tiles" not in unidentifiable_features(f)
