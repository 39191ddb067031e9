"""Online calibration of the serving path: follows a slower host step by bounded step, never
learns from a queued or failing replica, reports jumps, and feeds the twin's runs."""

from __future__ import annotations

import pytest

from orchestrator.control.calibration import CalibrationConfig, OnlineCalibration
from twin.config import EngineConfig
from twin.profile import load_profile
from twin.simulate import simulate
from twin.workload import Workload

CFG = CalibrationConfig()


def _replica(itl_live: float, itl_twin: float, *, finished: int = 100, waiting: int = 0,
             failed: int = 0) -> dict:
    return {"live": {"itl_mean_ms": itl_live, "finished": finished, "waiting": waiting,
                     "failed": failed},
            "predicted": {"itl_mean_ms": itl_twin}}


def test_follows_a_slower_engine_a_bounded_step_at_a_time() -> None:
    cal = OnlineCalibration()
    notes = cal.update({"g/0": _replica(15.0, 10.0), "g/1": _replica(15.0, 10.0)},
                       {"ttft_mean_ms": 80.0, "failed": 0}, 50.0, CFG)
    assert cal.step_scale == pytest.approx(1.10)  # 1.5x asked, 10 % allowed
    assert cal.ttft_offset_ms == pytest.approx(5.0)  # 30 ms off, 10 % of 50 ms allowed
    assert any("1.50x" in n for n in notes) and any("+30.0 ms" in n for n in notes)
    assert cal.fitted_on == 200 and cal.updates == 1
    # as the twin's figures come closer (they are run with the calibration), the steps shrink
    for _ in range(10):
        cal.update({"g/0": _replica(15.0, 10.0 * cal.step_scale)}, None, float("nan"), CFG)
    assert cal.step_scale == pytest.approx(1.5, rel=0.02)


def test_a_queued_or_failing_replica_teaches_nothing() -> None:
    cal = OnlineCalibration()
    cal.update({"g/0": _replica(40.0, 10.0, waiting=12), "g/1": _replica(40.0, 10.0, failed=3),
                "g/2": _replica(40.0, 10.0, finished=5)}, None, float("nan"), CFG)
    assert cal.updates == 0 and cal.step_scale == 1.0
    assert set(cal.last["skipped"]) == {"g/0", "g/1", "g/2"}
    assert "waiting" in cal.last["skipped"]["g/0"] and "failed" in cal.last["skipped"]["g/1"]
    cal.update({"g/0": _replica(40.0, 10.0)}, {"ttft_mean_ms": 900.0, "failed": 4}, 50.0, CFG)
    assert cal.ttft_offset_ms == 0.0  # the ingress saw failures: its TTFT is not the path's


def test_bounds_hold_and_the_calibrated_profile_feeds_the_twin() -> None:
    cal = OnlineCalibration()
    for _ in range(100):
        cal.update({"g/0": _replica(100.0, 1.0)}, None, float("nan"), CFG)
    assert cal.step_scale == CFG.scale_bounds[1]
    profile = load_profile("tiny-llama-cpu")
    calibrated = cal.calibrated(profile)
    base = profile.serving_path.step_scale if profile.serving_path else 1.0
    assert calibrated.serving_path.step_scale == pytest.approx(base * CFG.scale_bounds[1])
    w = Workload.from_yaml("examples/workload_cpu_light.yaml")
    cfg = EngineConfig(max_loras=6, max_lora_rank=16, max_cpu_loras=6, **profile.default_engine)
    plain = simulate(w, cfg, profile, seed=0, duration_s=60).metrics
    slow = simulate(w, cfg, calibrated, seed=0, duration_s=60).metrics
    assert slow["tpot_mean_ms"] > 2.5 * plain["tpot_mean_ms"]
    assert "step x" in cal.describe(profile) and "fitted on" in cal.describe(profile)
    assert OnlineCalibration().calibrated(profile) is profile  # nothing learnt, nothing changed


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="calibration.max_step"):
        CalibrationConfig(max_step=1.5)
    with pytest.raises(ValueError, match="calibration.scale_bounds"):
        CalibrationConfig(scale_bounds=(1.2, 2.0))
