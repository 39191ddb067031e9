"""`simulate`: a pure function of (workload, engine config, profile, seed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from twin.config import ConfigError
from twin.profile import InfeasibleConfigError, load_profile
from twin.simulate import build_engine_config, simulate
from twin.workload import AdapterSpec, Workload, uniform_workload

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def llama():
    return load_profile("llama-3.1-8b-instruct")


def small(rate: float = 4.0) -> Workload:
    return uniform_workload(16, rate, ranks=[8, 16], seed=3, duration_s=120.0)


def test_same_inputs_same_result_bit_for_bit(llama):
    w = small()
    cfg = build_engine_config(w, llama, max_loras=8)
    a = simulate(w, cfg, llama, seed=5)
    b = simulate(w, cfg, llama, seed=5)
    c = simulate(w, cfg, llama, seed=6)
    np.testing.assert_array_equal(a.records.finish_s, b.records.finish_s)
    assert {k: v for k, v in a.metrics.items() if k != "wall_s" and "speedup" not in k} == {
        k: v for k, v in b.metrics.items() if k != "wall_s" and "speedup" not in k
    }
    assert a.metrics["completed"] != c.metrics["completed"] or not np.array_equal(
        a.records.arrival_s, c.records.arrival_s
    )


def test_light_load_is_served_and_heavy_load_starves(llama):
    # a long window: requests arriving in the last seconds cannot finish, so short windows
    # always look a little starved (the reference runs use an hour)
    w = uniform_workload(16, 2.0, ranks=[8, 16], seed=3, duration_s=900.0)
    cfg = build_engine_config(w, llama, max_loras=16, max_num_seqs=2048)
    light = simulate(w, cfg, llama, seed=0)
    assert not light.metrics["starved"]
    assert light.metrics["total_throughput_tps"] == pytest.approx(
        light.metrics["offered_total_tps"], rel=0.1
    )
    heavy = simulate(w.scaled(40.0), cfg, llama, seed=0)
    assert heavy.metrics["starved"]
    assert heavy.metrics["ttft_mean_ms"] > 10 * light.metrics["ttft_mean_ms"]


def test_fewer_adapter_slots_cannot_increase_throughput_under_load(llama):
    w = uniform_workload(64, 20.0, ranks=[8], seed=1, duration_s=300.0)
    tight = simulate(w, build_engine_config(w, llama, max_loras=2, max_num_seqs=2048), llama)
    roomy = simulate(w, build_engine_config(w, llama, max_loras=64, max_num_seqs=2048), llama)
    assert tight.metrics["total_throughput_tps"] < roomy.metrics["total_throughput_tps"]
    # two slots for 64 busy adapters: the LoRA admission rule makes most of them wait
    assert tight.metrics["ttft_mean_ms"] > 10 * roomy.metrics["ttft_mean_ms"]


def test_default_rank_covers_the_largest_adapter_and_smaller_is_an_error(llama):
    w = Workload(
        name="r", adapters=(AdapterSpec("a", 8, 1.0), AdapterSpec("b", 24, 1.0)),
        lengths=small().lengths,
    )
    assert build_engine_config(w, llama, max_loras=2).max_lora_rank == 32
    with pytest.raises(ConfigError, match="b \\(rank 24\\).*max_lora_rank >= 32"):
        build_engine_config(w, llama, max_loras=2, max_lora_rank=16)


def test_infeasible_slots_fail_before_simulating(llama):
    w = small()
    with pytest.raises(InfeasibleConfigError, match="What fits"):
        build_engine_config(w, llama, max_loras=384, max_lora_rank=32)


def test_per_adapter_rows_cover_every_adapter(llama):
    w = small()
    res = simulate(w, build_engine_config(w, llama, max_loras=4), llama, seed=0)
    assert [r["adapter"] for r in res.per_adapter] == [a.id for a in w.adapters]
    assert sum(r["completed"] for r in res.per_adapter) == res.metrics["completed"]


def test_timeseries_is_sampled_over_the_run(llama):
    w = small()
    res = simulate(w, build_engine_config(w, llama, max_loras=4), llama, seed=0)
    ts = res.timeseries
    assert len(ts["t_s"]) >= 10 and np.all(np.diff(ts["t_s"]) > 0)
    assert ts["kv_usage"].min() >= 0 and ts["kv_usage"].max() <= 1


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("workload_*.yaml")))
def test_every_example_workload_simulates(llama, name):
    w = Workload.from_yaml(EXAMPLES / name)
    cfg = build_engine_config(w, llama, max_loras=8)
    res = simulate(w, cfg, llama, seed=0, duration_s=min(w.duration_s, 120.0))
    assert res.metrics["offered_requests"] > 0
    assert res.metrics["completed"] > 0


def test_a_window_without_requests_serves_nothing_and_does_not_starve(llama):
    """A fleet whose load stopped: the controller verifies its plan on the zero-rate estimate."""
    w = small().scaled(0.0)
    res = simulate(w, build_engine_config(w, llama, max_loras=8), llama, seed=0)
    assert res.metrics["completed"] == 0 and res.metrics["total_throughput_tps"] == 0.0
    assert not res.metrics["starved"]
