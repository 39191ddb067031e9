"""Workload specs, YAML format, generators, request generation and the Azure trace loader."""

from __future__ import annotations

import copy
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from twin.azure_trace import adapter_weights, load_azure_trace, read_azure_trace
from twin.lengths import LengthModel
from twin.workload import (
    AdapterSpec,
    RequestBatch,
    TraceSpec,
    Workload,
    WorkloadError,
    few_hot_workload,
    generate_requests,
    reference_workload,
    uniform_workload,
    zipf_workload,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLE_CSV = EXAMPLES / "azure_trace_sample.csv"
FIXED = LengthModel(kind="fixed", prompt=100, output=20)


def _write_trace(path: Path, seconds: np.ndarray, header: str | None = None) -> Path:
    start = np.datetime64("2023-11-16T18:15:46.6805900", "ns")
    stamps = (start + (seconds * 1e9).astype("timedelta64[ns]")).astype(str)
    lines = [header or "TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{s.replace('T', ' ')[:27]},{100 + i % 7},{i % 5}" for i, s in enumerate(stamps)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _starts(field: str) -> str:
    """Regex: the error message starts with ``field: ``."""
    return "^" + re.escape(field) + ": "


def _small() -> dict:
    return {
        "name": "t",
        "duration_s": 100,
        "lengths": {"kind": "fixed", "prompt": 10, "output": 5},
        "adapters": [
            {"id": "a", "rank": 8, "rate_rps": 1.0},
            {"id": "b", "rank": 16, "rate_rps": 0.5},
        ],
    }


# --- request generation ------------------------------------------------------------------------


def test_generate_requests_is_deterministic_sorted_and_typed() -> None:
    w = zipf_workload(50, 10.0, duration_s=600.0)
    a, b = generate_requests(w, seed=3), generate_requests(w, seed=3)
    for name in ("arrival_s", "adapter", "prompt_len", "output_len"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = generate_requests(w, seed=4)
    assert len(a) != len(c) or not np.array_equal(a.arrival_s, c.arrival_s)
    assert isinstance(a, RequestBatch)
    assert a.arrival_s.dtype == np.float64 and a.adapter.dtype == np.int32
    assert a.prompt_len.dtype == np.int32 and a.output_len.dtype == np.int32
    assert np.all(np.diff(a.arrival_s) >= 0)
    assert a.arrival_s[0] >= 0 and a.arrival_s[-1] < 600.0
    assert a.adapter.min() >= 0 and a.adapter.max() < 50
    assert a.prompt_len.min() >= 1 and a.output_len.min() >= 1


def test_poisson_counts_match_rates_within_5_sigma() -> None:
    rates = [2.0, 1.0, 0.5, 0.1, 0.0]
    w = Workload(
        name="p",
        lengths=FIXED,
        duration_s=20_000.0,
        base_model_rate_rps=0.3,
        adapters=tuple(AdapterSpec(f"a{i}", 8, r) for i, r in enumerate(rates)),
    )
    batch = generate_requests(w, seed=11)
    counts = Counter(batch.adapter.tolist())
    for i, rate in enumerate([*rates, 0.3]):
        idx = i if i < len(rates) else -1
        expected = rate * w.duration_s
        assert abs(counts.get(idx, 0) - expected) <= 5 * np.sqrt(max(expected, 1.0))
    # inter-arrival times of the merged process are exponential: CV ~ 1
    gaps = np.diff(batch.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)


def test_duration_override_and_lengths_do_not_change_arrivals() -> None:
    w = uniform_workload(20, 4.0, lengths=FIXED)
    short = generate_requests(w, duration_s=60.0, seed=1)
    assert short.arrival_s.max() < 60.0
    other = generate_requests(
        Workload(w.name, w.adapters, LengthModel(kind="sharegpt"), w.duration_s), 60.0, seed=1
    )
    np.testing.assert_array_equal(short.arrival_s, other.arrival_s)
    np.testing.assert_array_equal(short.adapter, other.adapter)
    assert np.all(short.prompt_len == 100)


def test_5000_adapters_one_hour_is_fast() -> None:
    w = zipf_workload(5000, 40.0, ranks={8: 0.5, 16: 0.3, 32: 0.2})
    generate_requests(w, seed=0)  # warm caches (ShareGPT calibration)
    t0 = time.perf_counter()
    batch = generate_requests(w, seed=1)
    elapsed = time.perf_counter() - t0
    assert abs(len(batch) - 144_000) < 5 * np.sqrt(144_000)
    assert elapsed < 1.0


# --- generators --------------------------------------------------------------------------------


def test_zipf_rates_sum_to_total_and_decrease() -> None:
    w = zipf_workload(100, 12.5, alpha=1.2)
    rates = w.adapter_rates
    assert rates.sum() == pytest.approx(12.5)
    assert w.total_rate_rps == pytest.approx(12.5)
    assert np.all(np.diff(rates) < 0)
    assert rates[0] / rates[9] == pytest.approx(10**1.2)
    assert np.allclose(zipf_workload(10, 5.0, alpha=0.0).adapter_rates, 0.5)
    assert [a.id for a in w.adapters[:2]] == ["adapter-0000", "adapter-0001"]


def test_uniform_and_few_hot_rates() -> None:
    u = uniform_workload(8, 2.0, ranks=(8, 16, 32))
    assert np.allclose(u.adapter_rates, 0.25)
    assert [a.rank for a in u.adapters] == [8, 16, 32, 8, 16, 32, 8, 16]
    h = few_hot_workload(20, 10.0, n_hot=4, hot_share=0.8)
    assert np.allclose(h.adapter_rates[:4], 2.0) and np.allclose(h.adapter_rates[4:], 0.125)
    assert h.total_rate_rps == pytest.approx(10.0)
    assert few_hot_workload(4, 3.0, n_hot=4).total_rate_rps == pytest.approx(3.0)


def test_rank_mix_is_exact_and_seeded() -> None:
    mix = {8: 0.5, 16: 0.3, 64: 0.2}
    a = uniform_workload(101, 1.0, ranks=mix, seed=1)
    assert Counter(x.rank for x in a.adapters) == {8: 51, 16: 30, 64: 20}
    assert a == uniform_workload(101, 1.0, ranks=mix, seed=1)
    b = uniform_workload(101, 1.0, ranks=mix, seed=2)
    assert [x.rank for x in a.adapters] != [x.rank for x in b.adapters]


def test_reference_workload_follows_round_robin_recipe() -> None:
    w = reference_workload(128, [0.1, 0.05, 0.025], [8, 16], seed=0)
    assert Counter(a.rate_rps for a in w.adapters) == {0.1: 43, 0.05: 43, 0.025: 42}
    assert Counter(a.rank for a in w.adapters) == {8: 64, 16: 64}
    assert w.duration_s == 3600.0 and w.lengths.kind == "sharegpt"
    assert w.total_rate_rps == pytest.approx(7.5)
    # shuffled, but deterministic by seed
    rates = [a.rate_rps for a in w.adapters]
    assert rates != [[0.1, 0.05, 0.025][i % 3] for i in range(128)]
    assert w == reference_workload(128, [0.1, 0.05, 0.025], [8, 16], seed=0)
    assert w != reference_workload(128, [0.1, 0.05, 0.025], [8, 16], seed=1)
    weighted = reference_workload(128, [0.1], [8, 8, 16])
    assert Counter(a.rank for a in weighted.adapters) == {8: 86, 16: 42}


def test_scaled_and_offered_tokens() -> None:
    w = zipf_workload(10, 4.0, lengths=FIXED)
    w = Workload(w.name, w.adapters, w.lengths, w.duration_s, base_model_rate_rps=1.0)
    assert w.offered_tokens_per_s() == pytest.approx(5.0 * 120)
    s = w.scaled(2.5)
    assert s.total_rate_rps == pytest.approx(12.5)
    assert np.allclose(s.adapter_rates, 2.5 * w.adapter_rates)
    assert s.offered_tokens_per_s() == pytest.approx(2.5 * w.offered_tokens_per_s())
    assert [a.id for a in s.adapters] == [a.id for a in w.adapters]
    with pytest.raises(WorkloadError, match=r"^factor: "):
        w.scaled(-1)


# --- YAML --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small", "reference_hour", "zipf_200", "azure"])
def test_examples_load_and_round_trip(name: str, tmp_path: Path) -> None:
    w = Workload.from_yaml(EXAMPLES / f"workload_{name}.yaml")
    out = tmp_path / "sub" / "copy.yaml"
    out.parent.mkdir()
    w.to_yaml(out)
    again = Workload.from_yaml(out)
    assert again.adapters == w.adapters and again.lengths.kind == w.lengths.kind
    assert again.to_dict() == {
        **w.to_dict(),
        "lengths": again.lengths.to_dict(),
        **({"trace": again.trace.to_dict()} if w.trace else {}),
    }
    if w.trace is not None:  # paths were rewritten relative to the new file, same file
        assert Path(again.trace.path).resolve() == Path(w.trace.path).resolve()
    assert Workload.from_dict(w.to_dict()) == w


def test_example_contents() -> None:
    small = Workload.from_yaml(EXAMPLES / "workload_small.yaml")
    assert len(small.adapters) == 8 and small.duration_s == 600
    assert small.total_rate_rps == pytest.approx(2.0)
    assert {a.rank for a in small.adapters} == {8, 16}
    ref = Workload.from_yaml(EXAMPLES / "workload_reference_hour.yaml")
    assert ref.adapters == reference_workload(128, [0.1, 0.05, 0.025], [8, 16]).adapters
    z = Workload.from_yaml(EXAMPLES / "workload_zipf_200.yaml")
    assert len(z.adapters) == 200 and {a.rank for a in z.adapters} == {8, 16, 32, 64}


def test_generate_block_expands_like_the_generator() -> None:
    d = {
        "duration_s": 900,
        "lengths": {"kind": "fixed", "prompt": 10, "output": 5},
        "generate": {
            "shape": "few_hot",
            "n_adapters": 12,
            "total_rate_rps": 6.0,
            "n_hot": 2,
            "hot_share": 0.5,
            "ranks": [8, 16],
            "seed": 3,
        },
    }
    w = Workload.from_dict(d)
    expected = few_hot_workload(
        12, 6.0, n_hot=2, hot_share=0.5, ranks=[8, 16], seed=3, lengths=w.lengths, duration_s=900
    )
    assert w == expected
    assert w.name == "few_hot2-12"


def test_defaults() -> None:
    d = _small()
    del d["duration_s"], d["lengths"], d["name"]
    w = Workload.from_dict(d)
    assert w.duration_s == 3600.0 and w.base_model_rate_rps == 0.0
    assert w.lengths == LengthModel(kind="sharegpt") and w.trace is None
    assert w.name == "workload"
    d["adapters"] = [{"rank": 8, "rate_rps": 1.0}, {"rank": 8, "rate_rps": 1.0}]
    assert [a.id for a in Workload.from_dict(d).adapters] == ["adapter-0000", "adapter-0001"]


def _set(path: str, value: object):
    def apply(d: dict) -> None:
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return apply


_DELETE = object()
_GEN = {"shape": "zipf", "n_adapters": 10, "total_rate_rps": 2.0}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_set("adapters.1.rank", -1), "adapters[1].rank"),
        (_set("adapters.0.rank", 8.5), "adapters[0].rank"),
        (_set("adapters.0.rate_rps", -0.1), "adapters[0].rate_rps"),
        (_set("adapters.0.rate_rps", float("nan")), "adapters[0].rate_rps"),
        (_set("adapters.1.id", "a"), "adapters[1].id"),
        (_set("adapters.1.id", ""), "adapters[1].id"),
        (_set("adapters.0.rnak", 8), "adapters[0].rnak"),
        (_set("adapters.0.rank", _DELETE), "adapters[0].rank"),
        (_set("adapters", {"id": "x"}), "adapters"),
        (_set("adapters", []), "adapters"),
        (_set("duration_s", 0), "duration_s"),
        (_set("base_model_rate_rps", -1), "base_model_rate_rps"),
        (_set("name", ""), "name"),
        (_set("adaptors", []), "adaptors"),
        (_set("format_version", 2), "format_version"),
        (_set("lengths", {"kind": "weird"}), "lengths.kind"),
        (_set("lengths", {"kind": "sharegpt", "prompt_mean": -3}), "lengths.prompt_mean"),
        (_set("generate", dict(_GEN)), "generate"),
        (_set("adapters", _DELETE), "adapters"),
    ],
)
def test_validation_errors_name_the_field(mutate, field: str) -> None:
    d = copy.deepcopy(_small())
    mutate(d)
    with pytest.raises(WorkloadError, match=_starts(field)):
        Workload.from_dict(d)


@pytest.mark.parametrize(
    ("generate", "field"),
    [
        ({**_GEN, "shape": "pareto"}, "generate.shape"),
        ({**_GEN, "n_adapters": 0}, "generate.n_adapters"),
        ({**_GEN, "total_rate_rps": -1}, "generate.total_rate_rps"),
        ({**_GEN, "alpha": -0.5}, "generate.alpha"),
        ({**_GEN, "ranks": [8, -16]}, "generate.ranks[1]"),
        ({**_GEN, "ranks": []}, "generate.ranks"),
        ({**_GEN, "seed": -1}, "generate.seed"),
        ({**_GEN, "n_hot": 2}, "generate.n_hot"),
        ({**_GEN, "aplha": 1.0}, "generate.aplha"),
        ({"shape": "zipf", "n_adapters": 10}, "generate.total_rate_rps"),
        ({**_GEN, "shape": "few_hot", "hot_share": 1.5}, "generate.hot_share"),
        ({**_GEN, "shape": "few_hot", "n_hot": 11}, "generate.n_hot"),
        ({"shape": "reference", "n_adapters": 10, "rates": []}, "generate.rates"),
        ({"shape": "reference", "n_adapters": 10, "rates": [0.1], "alpha": 1}, "generate.alpha"),
    ],
)
def test_generate_errors_name_the_field(generate: dict, field: str) -> None:
    d = {"name": "g", "generate": generate}
    with pytest.raises(WorkloadError, match=_starts(field)):
        Workload.from_dict(d)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(WorkloadError, match="bad.yaml: invalid YAML"):
        Workload.from_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(WorkloadError, match="top level must be a mapping"):
        Workload.from_yaml(bad)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(WorkloadError, match=r"^adapter\.rank: must be a positive integer, got -1"):
        AdapterSpec("x", -1, 1.0)
    with pytest.raises(WorkloadError, match=r"^adapters\[1\]\.id: duplicate"):
        Workload("w", (AdapterSpec("x", 8, 1.0), AdapterSpec("x", 8, 1.0)), FIXED)
    with pytest.raises(WorkloadError, match=r"^trace\.mapping: "):
        TraceSpec(path="x.csv", mapping="hash")


# --- Azure trace -------------------------------------------------------------------------------


def test_azure_sample_parses() -> None:
    arrival, context, generated = read_azure_trace(SAMPLE_CSV)
    assert arrival.size == 200
    assert arrival[0] == 0.0 and np.all(np.diff(arrival) >= 0)
    # 7-digit fractions parsed exactly: 18:15:46.8834329 - 18:15:46.6805900
    assert arrival[1] == pytest.approx(0.2028429, abs=1e-9)
    assert context.min() >= 1 and generated.min() >= 1  # zero generations clamped
    batch = load_azure_trace(SAMPLE_CSV, 16, mapping="round_robin")
    assert len(batch) == 200 and batch.adapter.dtype == np.int32
    np.testing.assert_array_equal(batch.adapter, np.arange(200) % 16)
    np.testing.assert_array_equal(batch.prompt_len, context)
    half = load_azure_trace(SAMPLE_CSV, 16, time_scale=0.5, max_requests=50)
    assert len(half) == 50
    np.testing.assert_allclose(half.arrival_s, 0.5 * arrival[:50])


@pytest.fixture(scope="module")
def big_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    seconds = rng.permutation(np.cumsum(rng.exponential(0.05, 20_000)))  # unsorted on purpose
    return _write_trace(tmp_path_factory.mktemp("trace") / "big.csv", seconds)


def test_azure_mappings_behave(big_trace: Path) -> None:
    n = 10
    zipf = load_azure_trace(big_trace, n, mapping="zipf", alpha=1.0, seed=1)
    assert np.all(np.diff(zipf.arrival_s) >= 0) and zipf.arrival_s[0] == 0.0
    counts = np.bincount(zipf.adapter, minlength=n)
    expected = adapter_weights(n, "zipf", 1.0) * len(zipf)
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected))
    assert counts[0] > counts[-1] * 5
    uni = np.bincount(load_azure_trace(big_trace, n, mapping="uniform", seed=1).adapter)
    assert np.all(np.abs(uni - 2000) <= 5 * np.sqrt(2000))
    same = load_azure_trace(big_trace, [object()] * n, mapping="zipf", seed=1)
    np.testing.assert_array_equal(same.adapter, zipf.adapter)
    other = load_azure_trace(big_trace, n, mapping="zipf", seed=2)
    assert not np.array_equal(other.adapter, zipf.adapter)


def test_azure_missing_columns_are_named(tmp_path: Path) -> None:
    path = _write_trace(tmp_path / "t.csv", np.arange(3.0), header="TIMESTAMP,ContextTokens,Out")
    with pytest.raises(WorkloadError, match="missing column.*GeneratedTokens"):
        load_azure_trace(path, 4)
    d = {"name": "t", "trace": {"path": str(path), "n_adapters": 4}}
    with pytest.raises(WorkloadError, match=r"^trace\.path: .*GeneratedTokens"):
        Workload.from_dict(d)


def test_trace_workload_is_restricted_to_duration() -> None:
    w = Workload.from_yaml(EXAMPLES / "workload_azure.yaml")
    arrival = read_azure_trace(SAMPLE_CSV)[0]
    in_window = int((arrival < w.duration_s).sum())
    assert 0 < in_window < 200
    batch = generate_requests(w, seed=5)
    assert len(batch) == in_window and batch.arrival_s.max() < w.duration_s
    assert batch.adapter.min() >= 0 and batch.adapter.max() < len(w.adapters)
    assert w.total_rate_rps == pytest.approx(in_window / w.duration_s)
    assert np.all(np.diff(w.adapter_rates) < 0)  # zipf mapping -> decreasing expected rates
    assert w.lengths.kind == "empirical"
    again = generate_requests(w, seed=5)
    np.testing.assert_array_equal(batch.adapter, again.adapter)
    assert len(generate_requests(w, duration_s=10_000, seed=5)) == 200
    faster = generate_requests(w.scaled(2.0), seed=5)
    assert len(faster) == int((arrival * 0.5 < w.duration_s).sum())


def test_trace_with_adapter_list_and_base_model(tmp_path: Path) -> None:
    data = {
        "name": "t",
        "duration_s": 60,
        "base_model_rate_rps": 2.0,
        "trace": {"path": "azure_trace_sample.csv", "mapping": "uniform"},
        "adapters": [{"id": "x", "rank": 8}, {"id": "y", "rank": 16, "rate_rps": 9.0}],
    }
    w = Workload.from_dict(data, base_dir=EXAMPLES)
    in_window = int((read_azure_trace(SAMPLE_CSV)[0] < 60).sum())
    assert w.adapters[0].rate_rps == pytest.approx(in_window / 60 / 2)
    assert w.adapters[1].rate_rps == 9.0  # given rates are kept
    batch = generate_requests(w, seed=0)
    assert (batch.adapter == -1).sum() > 0
    assert (batch.adapter >= 0).sum() == in_window
    assert np.all(np.diff(batch.arrival_s) >= 0)
    out = tmp_path / "w.yaml"
    w.to_yaml(out)
    assert yaml.safe_load(out.read_text())["trace"]["path"] != str(SAMPLE_CSV)  # relative
    assert Workload.from_yaml(out).adapters == w.adapters


@pytest.mark.parametrize(
    ("trace", "extra", "field"),
    [
        ({"mapping": "hash"}, {}, "trace.mapping"),
        ({"format": "google"}, {}, "trace.format"),
        ({"time_scale": 0}, {}, "trace.time_scale"),
        ({"path": "missing.csv"}, {}, "trace.path"),
        ({"n_adapters": 0}, {}, "trace.n_adapters"),
        ({"ranks": [0]}, {}, "trace.ranks[0]"),
        ({"speed": 2}, {}, "trace.speed"),
        ({}, {"generate": _GEN}, "generate"),
    ],
)
def test_trace_errors_name_the_field(trace: dict, extra: dict, field: str) -> None:
    d = {
        "name": "t",
        "trace": {"path": "azure_trace_sample.csv", "n_adapters": 4, **trace},
        **extra,
    }
    with pytest.raises(WorkloadError, match=_starts(field)):
        Workload.from_dict(d, base_dir=EXAMPLES)
