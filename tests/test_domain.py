"""The surrogate's domain: rows outside what its planning trees were trained on are judged by
the twin (placement.predictors.DomainGuard), counted and reported; a workload mostly outside is
an error that names the feature and what to do (issue #17)."""

from __future__ import annotations

import numpy as np
import pytest

from placement.errors import PlacementError
from placement.predictors import MAX_TWIN_RUNS_PER_CALL, DomainGuard
from twin.config import EngineConfig
from twin.lengths import LengthModel
from twin.replica import PREDICTED_METRICS, ReplicaLoad
from twin.surrogate import DOMAIN_FEATURES, Domain, SurrogateError, load_surrogate

CONFIG = EngineConfig(max_loras=8, max_cpu_loras=16, max_lora_rank=16)


def load(output: int, n: int = 16, rate: float = 4.0) -> ReplicaLoad:
    return ReplicaLoad(tuple(f"a{i}" for i in range(n)), np.full(n, 16),
                       np.full(n, rate / n), LengthModel(kind="fixed", prompt=200,
                                                         output=output))


class RecordingTwin:
    """Stands in for TwinPredictor: remembers what it was asked, answers a fixed figure."""

    def __init__(self) -> None:
        self.calls: list[ReplicaLoad] = []
        self.windows: list[float | None] = []
        self.duration_s = 300.0
        self.profile = type("P", (), {"name": "llama-3.1-8b-instruct"})()

    def predict_one(self, ld: ReplicaLoad, config: EngineConfig,
                    duration_s: float | None = None) -> dict[str, float]:
        self.calls.append(ld)
        self.windows.append(duration_s)
        return {"total_throughput_tps": 123.0, "offered_total_tps": 456.0, "ttft_p50_ms": 1.0,
                "ttft_p99_ms": 2.0, "itl_p50_ms": 3.0, "itl_p99_ms": 4.0, "starved": True}


@pytest.fixture
def narrow():
    """The shipped Llama surrogate, with a domain of answers of 100-300 tokens only."""
    model = load_surrogate("llama-3.1-8b-instruct")
    x = model.features([load(100), load(300)], [CONFIG, CONFIG])
    model.domain_ = Domain.of(x)
    return model


def test_the_domain_round_trips_and_says_why(narrow) -> None:
    d = Domain.from_dict(narrow.domain_.to_dict())
    assert np.array_equal(d.low, narrow.domain_.low) and set(d.to_dict()) == set(DOMAIN_FEATURES)
    x = narrow.features([load(24), load(200)], [CONFIG, CONFIG])
    assert narrow.outside(x).tolist() == [True, False]
    assert narrow.domain_.why(x[0]).startswith("mean_output = 24 outside the trained [100, 300]")


def test_rows_outside_go_to_the_twin_once_and_are_reported(narrow) -> None:
    twin = RecordingTwin()
    guard = DomainGuard(narrow, twin)
    inside, outside = load(200), load(24)
    first = guard.predict([inside, outside], [CONFIG, CONFIG])
    assert first[1]["total_throughput_tps"] == 123.0 and first[1]["starved"] is True
    assert first[0]["total_throughput_tps"] != 123.0  # the trees answered the other
    guard.predict([outside], [CONFIG])  # remembered: no second run
    assert twin.calls == [outside]
    assert twin.windows == [300.0]  # short requests: the twin's own window
    assert guard.domain_report() == {"twin_runs": 1, "predictions": 2,
                                     "outside": {"mean_output": 1}, "light_load": 0}
    assert guard.domain_report()["predictions"] == 0  # reset by the first report
    cols = guard.predict_columns([outside], [CONFIG])
    assert set(cols) == set(PREDICTED_METRICS) and cols["starved"].tolist() == [True]
    guard.predict([load(3000)], [CONFIG])  # 3,000-token answers live about a minute or more
    assert 3000.0 <= twin.windows[-1] <= 7200.0  # fifty lives, so the tail stays ~2 %


def test_a_workload_outside_the_domain_is_an_error_naming_the_feature(narrow) -> None:
    guard = DomainGuard(narrow, RecordingTwin())
    many = [load(20, rate=1.0 + i) for i in range(MAX_TWIN_RUNS_PER_CALL + 1)]
    with pytest.raises(PlacementError, match=r"mean_output = 20 .*--predictor twin"):
        guard.predict(many, [CONFIG] * len(many))


def test_a_model_saved_without_its_domain_refuses(narrow) -> None:
    narrow.domain_ = None
    with pytest.raises(SurrogateError, match="without its training domain"):
        narrow.outside(narrow.features([load(200)], [CONFIG]))


def test_replicas_are_offered_no_more_slots_than_the_trees_know() -> None:
    """The planner's max_loras candidates stop at the trained range: one replica of 800 short
    requests' adapters is planned from the trees alone (without the limit: 77 twin runs for
    candidates beyond 384 slots, 33 s, and the same plan)."""
    from placement.context import PlacementContext
    from placement.planner import make_plan
    from placement.predictors import make_predictor
    from twin.profile import load_profile
    from twin.workload import uniform_workload

    profile = load_profile("llama-3.1-8b-instruct")
    guard = make_predictor("surrogate", profile)
    trained = guard.surrogate.max_loras_trained()
    ctx = PlacementContext.for_profile(profile, guard)
    assert ctx.max_loras_limit == trained and 64 <= trained < 800
    w = uniform_workload(800, 20.0, seed=1, ranks={8: 0.5, 16: 0.5},
                         lengths=LengthModel(kind="fixed", prompt=21, output=102))
    plan = make_plan(w, ctx)
    assert plan.replicas == 1 and plan.groups[0].engine.max_loras <= trained
    assert "outside_domain_predictions" not in plan.settings
    with pytest.raises(PlacementError, match="max_loras_limit"):
        PlacementContext.for_profile(profile, guard, max_loras_limit=0)


def test_a_light_load_the_trees_read_short_of_served_reads_the_no_queue_figure(narrow,
                                                                            monkeypatch) -> None:
    """Trees that call a replica at a sliver of its capacity 10 % short of served (and not
    starved) are read at the no-queue figure: all but the requests in flight when a training
    window closes. A heavy load keeps the trees' figure; each reading is counted."""
    from placement.predictors import LIGHT_LOAD_RATIO, TRAINING_WINDOW_S
    from twin.surrogate_features import FEATURE_NAMES

    honest = narrow.predict_arrays

    def short(x):  # noqa: ANN001, ANN202
        out = honest(x)
        out["total_throughput_tps"] = 0.9 * out["offered_total_tps"]
        out["starved"] = np.zeros(len(x), dtype=bool)
        return out

    monkeypatch.setattr(narrow, "predict_arrays", short)
    guard = DomainGuard(narrow, RecordingTwin())
    light, heavy = load(200, rate=0.05), load(200, rate=400.0)
    x = narrow.features([light, heavy], [CONFIG, CONFIG])
    ratio = x[:, FEATURE_NAMES.index("load_ratio")]
    assert ratio[0] < LIGHT_LOAD_RATIO < ratio[1]
    cols = guard.predict_columns([light, heavy], [CONFIG, CONFIG])
    row = x[0]
    life_s = (row[FEATURE_NAMES.index("ttft_light_est_ms")] + row[FEATURE_NAMES.index(
        "mean_output")] * row[FEATURE_NAMES.index("step_ms_est")]) / 1e3
    assert 0 < life_s < 60
    want = cols["offered_total_tps"][0] * (1 - life_s / TRAINING_WINDOW_S)
    assert cols["total_throughput_tps"][0] == pytest.approx(want)
    assert cols["total_throughput_tps"][1] == pytest.approx(0.9 * cols["offered_total_tps"][1])
    assert guard.domain_report()["light_load"] == 1
