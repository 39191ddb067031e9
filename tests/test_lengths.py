"""Length models: bounds, determinism, and the ShareGPT stand-in's published statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from twin.lengths import (
    SHAREGPT_OUTPUT_MEAN,
    SHAREGPT_PROMPT_MEAN,
    LengthModel,
    WorkloadError,
)

LLAMA3_PROMPT_SCALE = 222.7 / 250.9
LLAMA3_OUTPUT_SCALE = 198.0 / 231.5


@pytest.fixture(scope="module")
def sharegpt_sample() -> tuple[np.ndarray, np.ndarray]:
    return LengthModel(kind="sharegpt").sample(np.random.default_rng(123), 400_000)


def _table(tmp_path: Path, header: str = "prompt_tokens,output_tokens") -> Path:
    path = tmp_path / "lengths.csv"
    rows = [(10, 5), (200, 50), (3000, 900), (0, 0)]
    path.write_text(header + "\n" + "\n".join(f"{p},{o}" for p, o in rows) + "\n")
    return path


MODELS = [
    {"kind": "fixed", "prompt": 128, "output": 64},
    {"kind": "normal", "prompt_mean": 300, "prompt_std": 100, "output_mean": 50, "output_std": 80},
    {
        "kind": "lognormal",
        "prompt_mean": 300,
        "prompt_std": 400,
        "output_mean": 120,
        "output_std": 100,
        "max_prompt": 2000,
        "max_total": 2100,
    },
    {"kind": "sharegpt"},
    {"kind": "sharegpt", "prompt_mean": 250.9, "output_mean": 231.5},
]


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s["kind"])
def test_sample_shape_dtype_positive_and_deterministic(spec: dict) -> None:
    model = LengthModel.from_dict(spec)
    p1, o1 = model.sample(np.random.default_rng(7), 5000)
    p2, o2 = model.sample(np.random.default_rng(7), 5000)
    assert p1.dtype == np.int32 and o1.dtype == np.int32
    assert p1.shape == o1.shape == (5000,)
    assert p1.min() >= 1 and o1.min() >= 1
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(o1, o2)
    if spec["kind"] != "fixed":
        p3, _ = model.sample(np.random.default_rng(8), 5000)
        assert not np.array_equal(p1, p3)
    assert model.sample(np.random.default_rng(0), 0)[0].shape == (0,)


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s["kind"])
def test_dict_round_trip(spec: dict) -> None:
    model = LengthModel.from_dict(spec)
    assert LengthModel.from_dict(model.to_dict()) == model
    assert model.to_dict()["kind"] == spec["kind"]


def test_mean_is_deterministic_and_matches_samples() -> None:
    model = LengthModel.from_dict(MODELS[2])
    assert model.mean_prompt() == LengthModel.from_dict(MODELS[2]).mean_prompt()
    p, o = model.sample(np.random.default_rng(1), 200_000)
    assert model.mean_prompt() == pytest.approx(p.mean(), rel=0.02)
    assert model.mean_output() == pytest.approx(o.mean(), rel=0.02)
    fixed = LengthModel(kind="fixed", prompt=10, output=3)
    assert (fixed.mean_prompt(), fixed.mean_output()) == (10.0, 3.0)


def test_clamps_hold() -> None:
    model = LengthModel(
        kind="normal",
        prompt_mean=500,
        prompt_std=400,
        output_mean=100,
        output_std=300,
        min_prompt=16,
        max_prompt=800,
        min_output=2,
        max_output=400,
        max_total=1000,
    )
    p, o = model.sample(np.random.default_rng(3), 50_000)
    assert p.min() >= 16 and p.max() <= 800
    assert o.min() >= 2 and o.max() <= 400
    assert (p + o).max() <= 1000
    # clamping piles mass on the bounds instead of rejecting
    assert (p == 16).sum() > 0 and (o == 2).sum() > 0


def test_lognormal_fields_are_mean_and_std_of_the_variable() -> None:
    model = LengthModel(
        kind="lognormal", prompt_mean=400, prompt_std=300, output_mean=200, output_std=150
    )
    p, o = model.sample(np.random.default_rng(5), 300_000)
    assert p.mean() == pytest.approx(400, rel=0.02)
    assert p.std() == pytest.approx(300, rel=0.05)
    assert o.mean() == pytest.approx(200, rel=0.02)


def test_empirical_resamples_rows_jointly_and_clamps(tmp_path: Path) -> None:
    path = _table(tmp_path)
    model = LengthModel.from_dict({"kind": "empirical", "path": str(path), "max_prompt": 2048})
    p, o = model.sample(np.random.default_rng(0), 2000)
    pairs = set(zip(p.tolist(), o.tolist(), strict=True))
    assert pairs <= {(10, 5), (200, 50), (2048, 900), (1, 1)}
    assert len(pairs) == 4
    assert model.mean_prompt() == pytest.approx((10 + 200 + 2048 + 1) / 4)
    assert model.mean_output() == pytest.approx((5 + 50 + 900 + 1) / 4)


def test_empirical_accepts_azure_columns_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "lengths.csv").write_text("ContextTokens,GeneratedTokens\n100,10\n")
    model = LengthModel.from_dict({"kind": "empirical", "path": "lengths.csv"}, base_dir=tmp_path)
    assert model.mean_prompt() == 100 and model.mean_output() == 10


def test_empirical_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"^lengths\.path: file not found"):
        LengthModel.from_dict({"kind": "empirical", "path": str(tmp_path / "nope.csv")})
    bad = _table(tmp_path, header="prompt,completion")
    with pytest.raises(WorkloadError, match=r"^w\.lengths\.path: .*prompt_tokens"):
        LengthModel.from_dict({"kind": "empirical", "path": str(bad)}, where="w.lengths")


# --- ShareGPT stand-in -------------------------------------------------------------------------


def test_sharegpt_filters_hold(sharegpt_sample: tuple[np.ndarray, np.ndarray]) -> None:
    p, o = sharegpt_sample
    assert p.min() >= 4 and p.max() <= 1024
    assert o.min() >= 4
    assert (p + o).max() <= 2048


def test_sharegpt_means_match_llama3_pool(sharegpt_sample: tuple[np.ndarray, np.ndarray]) -> None:
    p, o = sharegpt_sample
    assert p.mean() == pytest.approx(SHAREGPT_PROMPT_MEAN, rel=0.02)
    assert o.mean() == pytest.approx(SHAREGPT_OUTPUT_MEAN, rel=0.02)
    model = LengthModel(kind="sharegpt")
    assert model.mean_prompt() == pytest.approx(222.7, rel=1e-6)
    assert model.mean_output() == pytest.approx(198.0, rel=1e-6)


def test_sharegpt_shape_matches_scaled_quartiles(
    sharegpt_sample: tuple[np.ndarray, np.ndarray],
) -> None:
    p, o = sharegpt_sample
    p25, p75 = np.percentile(p, [25, 75])
    o25, o75 = np.percentile(o, [25, 75])
    assert p25 == pytest.approx(23 * LLAMA3_PROMPT_SCALE, rel=0.1)
    assert p75 == pytest.approx(423 * LLAMA3_PROMPT_SCALE, rel=0.05)
    assert o25 == pytest.approx(27 * LLAMA3_OUTPUT_SCALE, rel=0.1)
    assert o75 == pytest.approx(359 * LLAMA3_OUTPUT_SCALE, rel=0.05)
    # heavy-tailed with many very short prompts: mean far above the lower quartile
    assert (p < 32).mean() > 0.25 and np.percentile(p, 90) > 2 * p.mean()


def test_sharegpt_rescaled_to_llama2_pool() -> None:
    model = LengthModel.from_dict({"kind": "sharegpt", "prompt_mean": 250.9, "output_mean": 231.5})
    p, o = model.sample(np.random.default_rng(9), 300_000)
    assert p.mean() == pytest.approx(250.9, rel=0.02)
    assert o.mean() == pytest.approx(231.5, rel=0.02)
    assert np.percentile(p, 25) == pytest.approx(23, rel=0.1)
    assert np.percentile(p, 75) == pytest.approx(423, rel=0.05)
    assert np.percentile(o, 75) == pytest.approx(359, rel=0.05)
    assert p.max() <= 1024 and (p + o).max() <= 2048


def test_sharegpt_custom_filters_are_applied_by_rejection() -> None:
    model = LengthModel(kind="sharegpt", max_prompt=256, max_total=512, min_output=16)
    p, o = model.sample(np.random.default_rng(2), 50_000)
    assert p.max() <= 256 and o.min() >= 16 and (p + o).max() <= 512
    assert model.mean_prompt() == pytest.approx(p.mean(), rel=0.02)
    assert model.mean_prompt() < SHAREGPT_PROMPT_MEAN


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "lengths.kind"),
        ({"kind": "zipfian"}, "lengths.kind"),
        ({"kind": "fixed", "prompt": -1, "output": 5}, "lengths.prompt"),
        ({"kind": "fixed", "prompt": 1.5, "output": 5}, "lengths.prompt"),
        ({"kind": "fixed", "prompt": 8}, "lengths.output"),
        ({"kind": "fixed", "prompt": 8, "output": 8, "max_total": 100}, "lengths.max_total"),
        (
            {"kind": "normal", "prompt_mean": 10, "prompt_std": 1, "output_mean": 5},
            "lengths.output_std",
        ),
        (
            {
                "kind": "normal",
                "prompt_mean": 10,
                "prompt_std": -1,
                "output_mean": 5,
                "output_std": 1,
            },
            "lengths.prompt_std",
        ),
        (
            {
                "kind": "lognormal",
                "prompt_mean": 0,
                "prompt_std": 1,
                "output_mean": 5,
                "output_std": 1,
            },
            "lengths.prompt_mean",
        ),
        ({"kind": "sharegpt", "min_prompt": 100, "max_prompt": 50}, "lengths.max_prompt"),
        ({"kind": "sharegpt", "max_total": 5}, "lengths.max_total"),
        ({"kind": "sharegpt", "prompt_mean": 2000}, "lengths.prompt_mean"),
        ({"kind": "sharegpt", "output_mean": "long"}, "lengths.output_mean"),
        ({"kind": "sharegpt", "promt_mean": 200}, "lengths.promt_mean"),
        ({"kind": "empirical"}, "lengths.path"),
    ],
)
def test_validation_errors_name_the_field(spec: dict, field: str) -> None:
    with pytest.raises(WorkloadError, match=rf"^{field}: "):
        LengthModel.from_dict(spec)


def test_from_dict_uses_where_prefix_and_rejects_non_mapping() -> None:
    with pytest.raises(WorkloadError, match=r"^workload\.lengths\.prompt: "):
        LengthModel.from_dict({"kind": "fixed", "prompt": 0, "output": 1}, "workload.lengths")
    with pytest.raises(WorkloadError, match=r"^lengths: "):
        LengthModel.from_dict("sharegpt")  # type: ignore[arg-type]


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(WorkloadError, match=r"^lengths\.output: "):
        LengthModel(kind="fixed", prompt=1, output=0)
