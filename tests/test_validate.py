"""`lorafleet validate`: rebuilding measured runs, scoring, and the CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.cli.main import main
from twin.validate import (
    METRICS,
    ValidationError,
    load_runs,
    run_workload,
    scatter_plots,
    summarize,
    validate,
)

RUNS = Path(__file__).resolve().parent.parent / "data/reference/vllm-0.8.5-h100/validation_runs.csv"


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    return load_runs(RUNS)


def test_only_ok_unflagged_rows_are_replayed(runs):
    raw = pd.read_csv(RUNS)
    assert len(runs) == int((raw["status"] == "ok").sum()) == 294
    assert set(runs["status"]) == {"ok"}


def test_missing_columns_are_named(tmp_path):
    bad = tmp_path / "runs.csv"
    pd.read_csv(RUNS).drop(columns=["rank_mix", "max_loras"]).to_csv(bad, index=False)
    with pytest.raises(ValidationError, match="max_loras.*rank_mix|rank_mix.*max_loras"):
        load_runs(bad)


def test_run_workload_rebuilds_the_configuration(runs):
    row = runs[(runs["run"] == "_64_192_32_") & (runs["model"] == "qwen-2.5-7b-instruct")].iloc[0]
    workload, config = run_workload(row, seed=3)
    ranks = json.loads(row["rank_mix"])
    rates = json.loads(row["adapter_rate_counts"])
    assert len(workload.adapters) == row["max_cpu_loras"] == 192
    got_ranks = pd.Series([a.rank for a in workload.adapters]).value_counts().to_dict()
    assert got_ranks == {int(k): v for k, v in ranks.items()}
    got_rates = pd.Series([a.rate_rps for a in workload.adapters]).value_counts().to_dict()
    assert got_rates == {float(k): v for k, v in rates.items()}
    assert workload.total_rate_rps == pytest.approx(row["offered_request_rate_rps"])
    assert (config.max_loras, config.max_cpu_loras, config.max_lora_rank) == (64, 192, 32)
    assert config.max_num_seqs == 2048 and workload.duration_s == 3600
    pool_in = row["pool_input_tokens"] / row["pool_prompts"]
    assert workload.lengths.mean_prompt() == pytest.approx(pool_in, rel=0.01)
    # which adapter gets which rate is random in the real runs: seeded here
    other, _ = run_workload(row, seed=4)
    assert [a.rate_rps for a in other.adapters] != [a.rate_rps for a in workload.adapters]


def test_early_eos_shortens_reference_outputs_only(runs):
    """The reference harness let answers end early (no ignore_eos): output means scaled, prompt
    means untouched; a bench row (ignore_eos) replays its own lengths whatever the scale."""
    row = runs[(runs["run"] == "_64_192_32_") & (runs["model"] == "qwen-2.5-7b-instruct")].iloc[0]
    full, _ = run_workload(row, seed=3)
    short, _ = run_workload(row, seed=3, output_scale=0.9)
    assert short.lengths.mean_output() == pytest.approx(0.9 * full.lengths.mean_output(), rel=0.01)
    assert short.lengths.mean_prompt() == pytest.approx(full.lengths.mean_prompt(), rel=1e-6)
    for bad in (0.0, 1.5, "x", True):
        with pytest.raises(ValidationError, match="^eos_output_scale:"):
            validate(runs.head(1), eos_output_scale=bad)


def test_summary_uses_standard_smape_and_ttft_only_where_not_starved():
    table = pd.DataFrame({
        "model": ["m", "m"],
        "measured_starved": [False, True],
        "twin_starved": [False, False],
        "offered_total_tps_est": [100.0, 100.0],
        **{k: [100.0, 100.0] for k in METRICS},
        **{f"twin_{k}": [50.0, 100.0] for k in METRICS},
        "authors_twin_total_throughput": [100.0, 300.0],
        "twin_wall_s": [0.1, 0.1],
    })
    s = summarize(table)
    one_miss = 100 * (2 * 50 / 150) / 2
    assert s["metrics"]["total_throughput_tps"]["smape"] == pytest.approx(one_miss, abs=1e-3)
    assert s["metrics"]["total_throughput_tps"]["authors_twin_smape"] == pytest.approx(50.0)
    assert s["metrics"]["ttft_mean_ms"]["n"] == 1
    assert s["metrics"]["ttft_mean_ms"]["smape"] == pytest.approx(200 * 50 / 150, abs=1e-3)
    assert s["starvation_accuracy"] == 0.5
    assert s["metrics"]["tpot_mean_ms"]["authors_twin_smape"] is None


def test_validate_replays_light_runs_closely(runs, tmp_path):
    light = runs[(runs["offered_request_rate_rps"] < 2) & (runs["max_loras"] >= 16)].head(3)
    result = validate(light, "auto", seed=0, workers=1)
    table = result.predictions
    assert len(table) == 3
    # lightly loaded runs are served in full; throughput is then the offered load
    err = np.abs(table["twin_total_throughput_tps"] / table["total_throughput_tps"] - 1)
    assert err.max() < 0.08
    assert not table["twin_starved"].any()
    paths = scatter_plots(table, tmp_path)
    assert len(paths) == len(METRICS) and all(p.stat().st_size > 1000 for p in paths)


def test_validate_cli_json(capsys, tmp_path):
    out = tmp_path / "pred.csv"
    code = main(["validate", str(RUNS), "--limit", "2", "--seed", "5", "--workers", "1",
                 "--out", str(out), "--json"])
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["n_runs"] == 2
    assert set(obj["metrics"]) == set(METRICS)
    for m in obj["metrics"].values():
        assert set(m) == {"smape", "n", "authors_twin_smape"}
    assert 0 <= obj["starvation_accuracy"] <= 1 and obj["wall_s"] > 0
    assert len(pd.read_csv(out)) == 2
    assert (tmp_path / "validate_itl_mean_ms.png").exists()


def test_missing_profile_is_an_error_naming_it(capsys, tmp_path):
    code = main(["validate", str(RUNS), "--profile", "h200-nope", "--limit", "1"])
    assert code == 2
    assert "h200-nope" in capsys.readouterr().err


def test_bench_rows_replay_their_exact_workload_and_seed():
    from twin.workload import Workload, generate_requests

    w = Workload.from_yaml(Path(__file__).resolve().parent.parent / "examples/workload_small.yaml")
    row = pd.Series({
        "run": "_4_8_16_x", "workload": w.name, "max_loras": 4, "max_cpu_loras": 8,
        "max_lora_rank": 16, "max_num_seqs": 32, "max_num_batched_tokens": 256,
        "window_s": 60.0, "workload_json": json.dumps(w.to_dict()), "seed": 3,
    })
    from twin.validate import run_seed

    replayed, config = run_workload(row, seed=0)
    assert run_seed(row, default=0) == 3
    assert replayed.duration_s == 60.0 and replayed.adapters == w.adapters
    assert config.max_num_batched_tokens == 256 and config.max_num_seqs == 32
    a = generate_requests(replayed, 60.0, seed=3)
    b = generate_requests(w, 60.0, seed=3)
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    np.testing.assert_array_equal(a.prompt_len, b.prompt_len)
    bad = row.copy()
    bad["workload_json"] = "{not json"
    with pytest.raises(ValidationError, match="workload_json"):
        run_workload(bad)
