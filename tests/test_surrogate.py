"""The LightGBM surrogate: features, the designed space, fit/predict/save, the CLI contract."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from orchestrator.cli.main import main
from twin.config import EngineConfig
from twin.lengths import LengthModel
from twin.profile import REPO_PROFILES_DIR, load_profile
from twin.replica import PREDICTED_METRICS, ReplicaLoad, TwinPredictor
from twin.surrogate import (
    DOMAIN_FEATURES,
    HELD_OUT_FRACTION,
    Surrogate,
    SurrogateError,
    design_held_out,
    held_out_mask,
    load_surrogate,
    macro_f1,
    surrogate_dir,
)
from twin.surrogate_data import (
    CAP_RANGE,
    MAX_LORAS_GRID,
    RANKS,
    RATE_SHAPES,
    SampleSpec,
    length_menu,
    run_samples,
    sample_space,
    table_designs,
)
from twin.surrogate_features import CAP_NEVER_S, FEATURE_NAMES, FeatureBuilder, build_features
from twin.workload import WorkloadError

PROFILE = "llama-3.1-8b-instruct"
RUNS = Path(__file__).resolve().parent.parent / "data/reference/vllm-0.8.5-h100/validation_runs.csv"
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def profile():
    return load_profile(PROFILE)


def _load(rates, ranks=None, lengths=None) -> ReplicaLoad:
    rates = np.asarray(rates, float)
    return ReplicaLoad(
        adapter_ids=tuple(f"a{i}" for i in range(len(rates))),
        ranks=np.asarray(ranks if ranks is not None else [8] * len(rates)),
        rates_rps=rates,
        lengths=lengths or LengthModel(kind="sharegpt"),
    )


# ------------------------------------------------------------------------------ features


def test_doubling_rates_doubles_load_features_and_keeps_the_shape(profile):
    cfg = EngineConfig(max_loras=4, max_cpu_loras=20, max_lora_rank=16, max_num_seqs=256)
    rates = np.linspace(0.1, 2.0, 20)
    base, double = build_features([_load(rates), _load(2 * rates)], [cfg, cfg], profile)
    for name in ("total_rate_rps", "offered_tps", "load_ratio", "rho"):
        assert double[COL[name]] == pytest.approx(2 * base[COL[name]], rel=1e-9), name
    for name in ("n_adapters", "share_top1", "share_top_slots", "entropy_norm", "rank8_share",
                 "kv_tokens", "capacity_tps", "max_loras_per_adapter"):
        assert double[COL[name]] == pytest.approx(base[COL[name]], rel=1e-9), name
    # a busier replica has a longer step and more adapters active at once
    assert double[COL["step_ms_est"]] > base[COL["step_ms_est"]]
    assert double[COL["active_adapters_est"]] > base[COL["active_adapters_est"]]


def test_feature_values_are_the_physical_summaries(profile):
    cfg = EngineConfig(max_loras=2, max_cpu_loras=4, max_lora_rank=32)
    load = _load([3.0, 1.0, 1.0, 1.0], ranks=[8, 16, 32, 32])
    x = build_features([load], [cfg], profile)[0]
    assert x[COL["n_adapters"]] == 4 and x[COL["total_rate_rps"]] == pytest.approx(6.0)
    assert x[COL["offered_tps"]] == pytest.approx(load.offered_tokens_per_s())
    assert x[COL["share_top1"]] == pytest.approx(0.5)
    assert x[COL["share_top_slots"]] == pytest.approx(4 / 6)  # the 2 hottest adapters
    assert (x[COL["rank8_share"]], x[COL["rank16_share"]], x[COL["rank32_share"]]) == (
        pytest.approx(0.5), pytest.approx(1 / 6), pytest.approx(1 / 3))
    assert x[COL["max_rank"]] == 32 and x[COL["kv_tokens"]] == profile.kv_tokens(cfg)
    # uniform rates have maximal entropy
    flat = build_features([_load([1.0] * 4)], [cfg], profile)[0]
    assert flat[COL["entropy_norm"]] == pytest.approx(1.0)
    assert x[COL["entropy_norm"]] < 0.99


def test_client_cap_features(profile):
    """An unbounded client is "never"; a cap is read against the offered rate and, when the
    replica is overloaded, against the excess over its capacity."""
    cfg = EngineConfig(max_loras=4, max_cpu_loras=8, max_lora_rank=16)
    free = _load(np.full(8, 50.0))
    x_free = build_features([free], [cfg], profile)[0]
    assert x_free[COL["client_cap_s"]] == x_free[COL["client_cap_fill_s"]] == CAP_NEVER_S
    x = build_features([replace(free, client_max_inflight=1000)], [cfg], profile)[0]
    cap_col = COL["client_cap_s"]
    np.testing.assert_array_equal(x[:cap_col], x_free[:cap_col])  # the rest is the load's
    assert x[cap_col] == pytest.approx(1000 / 400.0)
    excess = 400.0 - x[COL["capacity_rps"]]
    assert excess > 0
    assert x[COL["client_cap_fill_s"]] == pytest.approx(1000 / excess)
    light = replace(_load(np.full(8, 0.01)), client_max_inflight=1000)
    x_light = build_features([light], [cfg], profile)[0]
    assert x_light[cap_col] == pytest.approx(1000 / 0.08)
    assert x_light[COL["client_cap_fill_s"]] == CAP_NEVER_S  # the queue never fills


def test_client_cap_must_be_a_positive_int():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(WorkloadError, match="client_max_inflight"):
            replace(_load([1.0]), client_max_inflight=bad)


def test_twin_predictor_runs_the_load_behind_its_client_cap(profile):
    cfg = EngineConfig(max_loras=4, max_cpu_loras=8, max_lora_rank=16, max_num_seqs=64)
    load = _load(np.full(8, 20.0))  # far beyond what 64 sequences serve
    twin = TwinPredictor(profile, duration_s=60.0, seed=1)
    free, capped = twin.predict([load, replace(load, client_max_inflight=100)], [cfg, cfg])
    # the uncapped queue grows all minute; behind the cap a request waits for <= 100 others
    assert capped["ttft_p50_ms"] < free["ttft_p50_ms"] / 3


def test_batch_rows_equal_single_rows(profile):
    specs = sample_space(25, profile, seed=11) + sample_space(8, profile, seed=11,
                                                          design="capped")
    menu = {n: lm for n, lm, _ in length_menu(profile.max_model_len)}
    pairs = [s.build(menu) for s in specs]
    loads, cfgs = [p[0] for p in pairs], [p[1] for p in pairs]
    batch = FeatureBuilder(profile)(loads, cfgs)
    singles = np.vstack([build_features([ld], [c], profile) for ld, c in pairs])
    np.testing.assert_allclose(batch, singles, rtol=1e-12)
    assert batch.shape == (33, len(FEATURE_NAMES)) and np.isfinite(batch).all()


# ------------------------------------------------------------------------------ designed space


def test_sampler_is_seeded_and_covers_the_space(profile):
    specs = sample_space(250, profile, seed=5)
    assert specs[:40] == sample_space(40, profile, seed=5)
    assert specs[:40] != sample_space(40, profile, seed=6)
    n = np.array([s.n_adapters for s in specs])
    assert n.min() < 8 and n.max() >= 1000
    assert {s.shape for s in specs} == set(RATE_SHAPES)
    ranks = {int(p.split(":")[0]) for s in specs for p in s.ranks.split(",")}
    assert ranks == set(RANKS)
    assert len({s.max_loras for s in specs} & set(MAX_LORAS_GRID)) >= 12
    assert {s.lengths for s in specs} == {name for name, _, _ in length_menu(131072)}
    assert len({s.max_num_seqs for s in specs}) >= 5
    menu = {name: lm for name, lm, _ in length_menu(profile.max_model_len)}
    ratios = []
    for s in specs[:80]:
        load, cfg = s.build(menu)
        profile.check_feasible(cfg)  # every sampled config starts
        assert cfg.max_lora_rank >= load.max_rank and cfg.max_cpu_loras >= cfg.max_loras
        ratios.append(build_features([load], [cfg], profile)[0, COL["load_ratio"]])
    assert min(ratios) < 0.25 and max(ratios) > 1.5 and np.median(ratios) < 1.2


def _load_ratios(profile, specs):
    """Offered req/s over the analytic capacity the design scales them by."""
    menu = {name: lm for name, lm, _ in length_menu(profile.max_model_len)}
    pairs = [s.build(menu) for s in specs]
    assert all(p[0].client_max_inflight == (s.client_max_inflight or None)
               for p, s in zip(pairs, specs, strict=True))
    x = build_features([p[0] for p in pairs], [p[1] for p in pairs], profile)
    return np.array([s.total_rate_rps for s in specs]) / x[:, COL["capacity_rps"]]


def test_capped_designs_sit_behind_a_cap_each_in_its_load_band(profile):
    uncapped = sample_space(40, profile, seed=5)
    capped = sample_space(30, profile, seed=5, design="capped")
    light = sample_space(30, profile, seed=5, design="capped_light")
    assert all(s.client_max_inflight == 0 for s in uncapped)
    assert all(CAP_RANGE[0] <= s.client_max_inflight <= CAP_RANGE[1] for s in capped + light)
    assert capped[:10] == sample_space(10, profile, seed=5, design="capped")
    assert light[:10] == sample_space(10, profile, seed=5, design="capped_light")
    assert uncapped == sample_space(40, profile, seed=5)  # own streams: designs independent
    assert not {s.seed for s in capped} & {s.seed for s in light}
    over = _load_ratios(profile, capped)
    assert (over >= 0.8 - 1e-9).all() and over.max() > 3
    under = _load_ratios(profile, light)
    # (the band is drawn against the capacity at a nominal rate; at the drawn rate the active
    # adapters, and so the capacity, move a little)
    assert under.max() < 0.9 and np.median(under) < 0.5 and under.min() < 0.3


def test_the_wide_design_reaches_what_users_bring(profile):
    """Drawn lengths from a few tokens to thousands (short answers included: the 64/24-token
    service of issue #17), up to 5,000 adapters, placement's max_loras grid; its own stream."""
    from twin.surrogate_data import PLACEMENT_MAX_LORAS, parse_lengths

    wide = sample_space(300, profile, seed=5, design="wide")
    assert wide[:20] == sample_space(20, profile, seed=5, design="wide")
    assert sample_space(40, profile, seed=5) == sample_space(40, profile, seed=5)
    lengths = [parse_lengths(s.lengths) for s in wide]
    prompts = np.array([lm.mean_prompt() for lm in lengths])
    outputs = np.array([lm.mean_output() for lm in lengths])
    assert prompts.min() < 10 and prompts.max() > 1000
    assert outputs.min() < 5 and outputs.max() > 500
    assert ((prompts < 100) & (outputs < 30)).sum() >= 5
    n = np.array([s.n_adapters for s in wide])
    assert n.max() > 1500
    assert {s.max_loras for s in wide} - set(PLACEMENT_MAX_LORAS) <= {int(k) for k in n}
    assert {3, 6} <= {s.max_loras for s in wide}  # on placement's grid, not the first design's
    load, cfg = wide[0].build({})
    assert load.lengths == lengths[0] and cfg.max_loras == wide[0].max_loras
    with pytest.raises(ValueError, match="neither a menu entry"):
        parse_lengths("gamma:1:2")


def test_unknown_design_is_named():
    with pytest.raises(ValueError, match="capped_light"):
        sample_space(3, None, design="light")


def test_tables_from_before_the_capped_design_read_as_uncapped(profile):
    row = sample_space(1, profile, seed=5)[0].to_row()
    del row["spec_client_max_inflight"]
    assert SampleSpec.from_row(row).client_max_inflight == 0


def test_adding_capped_runs_keeps_the_uncapped_split():
    before = pd.DataFrame({"spec_client_max_inflight": [0] * 50})
    after = pd.DataFrame({"spec_client_max_inflight": [0] * 50 + [500] * 20})
    np.testing.assert_array_equal(design_held_out(before, 3), held_out_mask(50, 3))
    mask = design_held_out(after, 3)
    np.testing.assert_array_equal(mask[:50], held_out_mask(50, 3))
    assert mask[50:].sum() == round(20 * HELD_OUT_FRACTION)


def test_adding_light_capped_runs_keeps_the_other_splits():
    """A table from before the design column reads its capped rows as the capped design, and
    light capped rows appended later leave both earlier splits as they were."""
    old = pd.DataFrame({"spec_client_max_inflight": [0] * 50 + [500] * 20})
    assert list(table_designs(old)) == ["uncapped"] * 50 + ["capped"] * 20
    new = pd.DataFrame({"spec_client_max_inflight": [0] * 50 + [500] * 40,
                        "design": ["uncapped"] * 50 + ["capped"] * 20 + ["capped_light"] * 20})
    before, after = design_held_out(old, 3), design_held_out(new, 3)
    np.testing.assert_array_equal(after[:70], before)
    np.testing.assert_array_equal(after[70:], held_out_mask(20, 3 + 2))


# ------------------------------------------------------------------------------ a small model


@pytest.fixture(scope="module")
def runs_table(profile):
    """A few dozen short twin runs (the real training uses 3600 s windows)."""
    specs = sample_space(48, profile, seed=2)
    return run_samples(specs, profile, duration_s=240.0, workers=1)


@pytest.fixture(scope="module")
def small_model(profile, runs_table):
    return Surrogate(profile, n_estimators=40, min_child_samples=3).fit(
        runs_table, runs_table
    )


def test_run_samples_gives_features_and_targets(runs_table):
    assert len(runs_table) == 48
    assert set(FEATURE_NAMES) | set(PREDICTED_METRICS) <= set(runs_table.columns)
    assert runs_table["starved"].any() and not runs_table["starved"].all()
    frac = runs_table["total_throughput_tps"] / runs_table["offered_total_tps"]
    assert ((frac > 0) & (frac <= 1.0 + 1e-9)).all()


def test_heavier_unsaturated_load_gets_more_throughput(profile, small_model):
    cfg = EngineConfig(max_loras=16, max_cpu_loras=16, max_lora_rank=16, max_num_seqs=256)
    light, heavier = _load(np.full(16, 0.05)), _load(np.full(16, 0.1))
    out = small_model.predict([light, heavier], [cfg, cfg])
    assert out[1]["total_throughput_tps"] > out[0]["total_throughput_tps"] > 0
    assert out[1]["offered_total_tps"] == pytest.approx(heavier.offered_tokens_per_s())


def test_implements_the_replica_predictor_contract(profile, small_model):
    cfg = EngineConfig(max_loras=8, max_cpu_loras=40, max_lora_rank=16)
    loads = [_load(np.full(40, q)) for q in (0.01, 1.0, 20.0)]
    out = small_model.predict(loads, [cfg] * 3)
    assert small_model.name == "surrogate" and len(out) == 3
    for row in out:
        assert tuple(row) == PREDICTED_METRICS
        assert isinstance(row["starved"], bool)
        assert all(isinstance(row[k], float) for k in PREDICTED_METRICS if k != "starved")
    with pytest.raises(ValueError, match="differ in length"):
        small_model.predict(loads, [cfg])


def test_loads_behind_a_cap_go_to_the_capped_ensemble(profile, runs_table, small_model):
    cfg = EngineConfig(max_loras=8, max_cpu_loras=40, max_lora_rank=16)
    free = [_load(np.full(40, q)) for q in (0.05, 2.0)]
    capped = [replace(ld, client_max_inflight=500) for ld in free]
    with pytest.raises(SurrogateError, match="--capped-samples"):
        small_model.predict(capped, [cfg, cfg])
    model = Surrogate(profile, n_estimators=40, min_child_samples=3).fit(runs_table, runs_table)
    model.capped_ = Surrogate(profile, n_estimators=10, min_child_samples=3).fit(
        runs_table, runs_table)
    mixed = model.predict_columns([free[0], capped[0], free[1], capped[1]], [cfg] * 4)
    own = small_model.predict_columns(free, [cfg, cfg])
    behind = model.capped_._predict_own(model.features(capped, [cfg, cfg]))
    for k, v in mixed.items():
        np.testing.assert_array_equal(v[[0, 2]], own[k])
        np.testing.assert_array_equal(v[[1, 3]], behind[k])
    assert not np.allclose(mixed["ttft_p50_ms"][[0, 2]], mixed["ttft_p50_ms"][[1, 3]])


def test_a_replica_with_no_traffic_serves_nothing_and_is_not_starved(small_model):
    cfg = EngineConfig(max_loras=4, max_cpu_loras=4, max_lora_rank=16)
    (out,) = small_model.predict([_load(np.zeros(4))], [cfg])
    assert out["total_throughput_tps"] == 0 and out["offered_total_tps"] == 0
    assert out["starved"] is False


@pytest.mark.parametrize("rows", [1, 48, 200])  # single walks, and the parallel block walk
def test_compiled_trees_match_lightgbm(runs_table, small_model, rows):
    x = np.resize(runs_table.loc[:, list(FEATURE_NAMES)].to_numpy(float),
                  (rows, len(FEATURE_NAMES)))
    assert small_model.forest_ is not None
    ours = small_model.raw_scores(x)
    for j, name in enumerate(small_model.model_names):
        ref = small_model.boosters_[name].predict(x, raw_score=True)
        np.testing.assert_allclose(ours[:, j], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("target", ["fraction", "log_fraction", "log", "log_vs_capacity"])
def test_metrics_follow_each_target_from_the_tree_sums(profile, runs_table, target):
    """The compiled pass (``_finish``) against the targets' definitions in numpy."""
    m = Surrogate(profile, n_estimators=10, throughput_target=target,
                  min_child_samples=3).fit(runs_table, runs_table)
    x = runs_table.loc[:, list(FEATURE_NAMES)].to_numpy(float, copy=True)
    x[0, COL["offered_tps"]] = 0.0  # nothing offered: nothing served, never starved
    raw, pred = m.raw_scores(x), m.predict_arrays(x)
    offered = x[:, COL["offered_tps"]]
    servable = np.maximum(np.minimum(offered, x[:, COL["capacity_tps"]]), 1e-6)
    per_offered = np.exp(raw[:, 0]) / np.maximum(offered, 1e-12)
    frac = {"fraction": np.clip(raw[:, 0], 0, 1), "log_fraction": np.minimum(np.exp(raw[:, 0]), 1),
            "log": np.minimum(per_offered, 1),
            "log_vs_capacity": np.minimum(per_offered * servable, 1)}[target]
    np.testing.assert_allclose(pred["total_throughput_tps"], frac * offered, rtol=1e-12)
    np.testing.assert_array_equal(pred["offered_total_tps"], offered)
    for j, k in enumerate(("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"), start=1):
        np.testing.assert_allclose(pred[k], np.exp(raw[:, j]), rtol=1e-12)
    np.testing.assert_array_equal(pred["starved"], (raw[:, -1] > 0) & (offered > 0))
    assert pred["starved"].dtype == bool and not pred["starved"][0]


def test_save_load_round_trip(tmp_path, profile, runs_table, small_model):
    small_model.save(tmp_path / "m")
    again = Surrogate.load(tmp_path / "m")
    assert again.profile.name == profile.name and again.model_names == small_model.model_names
    x = runs_table.loc[:, list(FEATURE_NAMES)].to_numpy(float)
    a, b = small_model.predict_arrays(x), again.predict_arrays(x)
    for k in PREDICTED_METRICS:
        np.testing.assert_array_equal(a[k], b[k])


def test_modes_and_macro_f1(profile, runs_table):
    for target in ("fraction", "log"):
        m = Surrogate(profile, n_estimators=10, throughput_target=target,
                      starvation="fraction", min_child_samples=3).fit(runs_table, runs_table)
        assert m.model_names[-1] != "starved"
        pred = m.predict_arrays(runs_table.loc[:, list(FEATURE_NAMES)].to_numpy(float))
        frac = pred["total_throughput_tps"] / pred["offered_total_tps"]
        np.testing.assert_array_equal(pred["starved"], frac < 0.9)
    with pytest.raises(SurrogateError, match="throughput_target"):
        Surrogate(profile, throughput_target="linear")
    assert macro_f1([True, False, True], [True, False, True]) == 1.0
    assert macro_f1([True, True], [True, False]) == pytest.approx((1 / 1.5 + 0) / 2)


# ------------------------------------------------------------------------------ where models live


def test_load_surrogate_error_names_the_directory_and_command(tmp_path, monkeypatch):
    shutil.copy(REPO_PROFILES_DIR / f"{PROFILE}.yaml", tmp_path / "mine.yaml")
    monkeypatch.setenv("LORAFLEET_PROFILES", str(tmp_path))
    assert surrogate_dir("mine") == tmp_path / "mine.surrogate"
    with pytest.raises(SurrogateError) as err:
        load_surrogate("mine")
    assert str(tmp_path / "mine.surrogate") in str(err.value)
    assert "lorafleet surrogate train --profile mine" in str(err.value)


def test_cli_train_then_eval_on_a_tiny_design(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["surrogate", "train", "--profile", PROFILE, "--samples", "30",
                 "--capped-samples", "8", "--capped-light-samples", "5", "--wide-samples", "10",
                 "--window", "120", "--workers", "1", "--seed", "4", "--out", str(out),
                 "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["n_samples"] == 53 and meta["n_capped"] == 13 and (out / "meta.yaml").exists()
    assert meta["n_wide"] == 10 and meta["held_out_wide"]["total_throughput_tps"]["n"] == 2
    # the planning trees know where they were trained: the uncapped and wide designs' range
    assert set(meta["domain"]) == set(DOMAIN_FEATURES)
    lo, hi = meta["domain"]["mean_output"]
    assert 0 < lo < hi
    assert meta["n_capped_light"] == 5 and meta["n_held_out_capped"] == 2 + 1
    assert meta["held_out_capped_design"]["total_throughput_tps"]["n"] == 2
    assert meta["held_out_capped_light"]["total_throughput_tps"]["n"] == 1
    stored = pd.read_csv(out / "samples.csv.gz")
    assert (stored["design"] == "capped_light").sum() == 5
    assert meta["capped"] == "capped" and (out / "capped" / "throughput.txt").exists()
    assert (out / "samples.csv.gz").exists() and meta["window_s"] == 120
    assert main(["surrogate", "eval", "--profile", PROFILE, "--dir", str(out), "--runs",
                 "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the planning trees' held-out rows: the first design's and the wide design's
    assert report["held_out"]["total_throughput_tps"]["n"] + report["held_out_wide"][
        "total_throughput_tps"]["n"] == meta["n_held_out"]
    assert report["held_out_capped_design"]["total_throughput_tps"]["n"] == 2
    assert report["held_out_capped_light"]["total_throughput_tps"]["n"] == 1


def test_cli_eval_json_on_the_shipped_model(tmp_path, capsys):
    runs = pd.read_csv(RUNS)
    small = runs[(runs["model"] == PROFILE) & (runs["status"] == "ok")].head(6)
    small.to_csv(tmp_path / "runs.csv", index=False)
    assert main(["surrogate", "eval", "--profile", PROFILE, "--runs",
                 str(tmp_path / "runs.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # eval re-scores the held-out runs stored with the model: the same figures training wrote
    meta = yaml.safe_load((surrogate_dir(PROFILE) / "meta.yaml").read_text())
    held = report["held_out"]
    for metric in ("total_throughput_tps", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                   "itl_p99_ms"):
        assert held[metric]["n"] == meta["held_out"][metric]["n"] > 0
        assert held[metric]["smape"] == pytest.approx(meta["held_out"][metric]["smape"],
                                                      abs=0.01)
    assert held["starvation_macro_f1"] == pytest.approx(
        meta["held_out"]["starvation_macro_f1"], abs=1e-3)
    # the real runs: the surrogate tracks what H100s measured (all 131 runs: ~5-10 % SMAPE)
    real = report["real_runs"]
    assert real["n_runs"] == 6 and real["total_throughput_tps"]["n"] == 6
    assert 0 <= real["total_throughput_tps"]["smape"] <= 25.0
    assert real["total_throughput_tps_uncapped_client"]["n"] == 6
    assert (real["total_throughput_tps_cap_reached"]["n"]
            + real["total_throughput_tps_cap_not_reached"]["n"]) <= 6
    assert "starvation_macro_f1" in real
    assert report["predict_us_single"] > 0 and report["predict_ms_batch_1000"] > 0


def test_cli_eval_without_a_model_exits_2(tmp_path, capsys, monkeypatch):
    shutil.copy(REPO_PROFILES_DIR / f"{PROFILE}.yaml", tmp_path / "bare.yaml")
    monkeypatch.setenv("LORAFLEET_PROFILES", str(tmp_path))
    assert main(["surrogate", "eval", "--profile", "bare", "--runs", "none"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "lorafleet surrogate train --profile bare" in err


def test_real_runs_read_cap_bound_rows_behind_their_client_cap(tmp_path):
    """A run whose harness cap bound is predicted at its capped load; the same rows with no
    cap recorded (an unbounded client) are predicted at the offered load."""
    from twin.surrogate import _real_run_cap_bound, evaluate_real_runs, load_surrogate

    runs = pd.read_csv(RUNS)
    runs = runs[(runs["model"] == PROFILE) & (runs["status"] == "ok")
                & runs["quality_flag"].isna()]
    bound = runs[[_real_run_cap_bound(r) is True for _, r in runs.iterrows()]].head(3)
    assert len(bound) == 3
    model = load_surrogate(PROFILE)
    bound.to_csv(tmp_path / "capped.csv", index=False)
    capped, _, _ = evaluate_real_runs(model, tmp_path / "capped.csv")
    assert capped["total_throughput_tps_cap_reached"]["n"] == 3
    assert capped["total_throughput_tps"]["smape"] != capped[
        "total_throughput_tps_uncapped_client"]["smape"]
    bound.assign(client_max_inflight=np.nan).to_csv(tmp_path / "free.csv", index=False)
    free, _, _ = evaluate_real_runs(model, tmp_path / "free.csv")
    assert free["total_throughput_tps"] == free["total_throughput_tps_uncapped_client"]
    assert free["total_throughput_tps_uncapped_client"] == capped[
        "total_throughput_tps_uncapped_client"]
