"""The twin's serving-path term: validation, what applying it does, and that the fit recovers a
term planted in synthetic measurements."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from placement.plan import profile_sha256
from twin.config import EngineConfig
from twin.profile import Profile, ProfileError, load_profile
from twin.serving_path import (
    QUANTILE_LEVELS,
    MeasuredRequests,
    ServingPath,
    ServingPathError,
    fit_serving_path,
    fit_term,
)
from twin.simulate import simulate, simulate_requests
from twin.workload import Workload, generate_requests

N = len(QUANTILE_LEVELS)
LIGHT = "examples/workload_cpu_light.yaml"


def _term(**kw) -> ServingPath:
    base = dict(step_scale=1.2, decode_seq_ms=0.0, prefill_token_ms=0.0, request_ms=20.0,
                prompt_token_ms=0.05,
                ttft_noise_ms=tuple(np.linspace(-4.0, 12.0, N)),
                itl_noise_ms=tuple(np.linspace(-2.0, 6.0, N)), fitted_on=200, source="test")
    base.update(kw)
    return ServingPath(**base)


def _config(profile: Profile, workload: Workload) -> EngineConfig:
    return EngineConfig(max_loras=len(workload.adapters), max_lora_rank=16,
                        max_cpu_loras=len(workload.adapters), **profile.default_engine)


def test_round_trip_and_errors_name_the_field() -> None:
    t = _term()
    assert ServingPath.from_dict(t.to_dict()) == replace(
        t, ttft_noise_ms=tuple(round(v, 4) for v in t.ttft_noise_ms),
        itl_noise_ms=tuple(round(v, 4) for v in t.itl_noise_ms))
    bad = t.to_dict()
    bad["ttft_noise_ms"] = bad["ttft_noise_ms"][:-1]
    with pytest.raises(ServingPathError, match=r"p\.serving_path\.ttft_noise_ms: must be a list"):
        ServingPath.from_dict(bad, "p.serving_path")
    bad = t.to_dict()
    bad["ttft_noise_ms"] = list(reversed(bad["ttft_noise_ms"]))
    with pytest.raises(ServingPathError, match="ttft_noise_ms: must be non-decreasing"):
        ServingPath.from_dict(bad)

    with pytest.raises(ServingPathError, match=r"unknown field\(s\) \['colour'\]"):
        ServingPath.from_dict({**t.to_dict(), "colour": 1})
    with pytest.raises(ServingPathError, match="step_scale: 9.0 is outside"):
        ServingPath.from_dict({**t.to_dict(), "step_scale": 9.0})
    with pytest.raises(ServingPathError, match="request_ms: must be a number"):
        ServingPath.from_dict({**t.to_dict(), "request_ms": "fast"})
    d = load_profile("tiny-llama-cpu").to_dict()
    d["serving_path"] = {**t.to_dict(), "request_ms": -1.0}
    with pytest.raises(ProfileError, match=r"x\.yaml\.serving_path\.request_ms: must be a number "
                                           ">= 0"):
        Profile.from_dict(d, "x.yaml")


def test_the_term_moves_latency_not_the_engine_and_is_seeded() -> None:
    w = Workload.from_yaml(LIGHT)
    p = load_profile("tiny-llama-cpu").with_serving_path(None)
    cfg = _config(p, w)
    engine = simulate(w, cfg, p, seed=3, duration_s=120)
    t = _term(step_scale=1.0)
    client = simulate(w, cfg, p.with_serving_path(t), seed=3, duration_s=120)
    again = simulate(w, cfg, p.with_serving_path(t), seed=3, duration_s=120)
    assert engine.metrics["latency_view"] == "engine" and client.metrics["latency_view"] == "client"
    timing = ("wall_s", "speedup_vs_realtime")

    def figures(m: dict) -> dict:
        return {k: v for k, v in m.items() if k not in timing}

    assert figures(client.metrics) == figures(again.metrics)  # pure: inputs and seed
    # the same engine run (scale 1): same completions; TTFT later by the line + the noise's mean
    assert client.metrics["completed"] == pytest.approx(engine.metrics["completed"], abs=2)
    shift = client.metrics["ttft_mean_ms"] - engine.metrics["ttft_mean_ms"]
    expect = t.request_ms + t.prompt_token_ms * float(np.mean(client.records.prompt_len)) + 4.0
    assert shift == pytest.approx(expect, rel=0.1)
    # gaps: a noise draw each (the table's median is +2 ms, its top +6)
    assert client.metrics["itl_median_ms"] - engine.metrics["itl_median_ms"] == pytest.approx(
        2.0, abs=1.0)
    assert client.metrics["itl_p99_ms"] > engine.metrics["itl_p99_ms"] + 3.0
    off = simulate(w, cfg, p.with_serving_path(t), seed=3, duration_s=120, serving=False)
    assert figures(off.metrics) == figures(engine.metrics)


def test_step_scale_slows_the_engine() -> None:
    w = Workload.from_yaml(LIGHT)
    p = load_profile("tiny-llama-cpu").with_serving_path(None)
    cfg = _config(p, w)
    zero = (0.0,) * N
    fast = simulate(w, cfg, p, seed=1, duration_s=120).metrics
    slow = simulate(w, cfg, p.with_serving_path(_term(step_scale=2.0, request_ms=0.0,
                                                      prompt_token_ms=0.0, ttft_noise_ms=zero,
                                                      itl_noise_ms=zero)),
                    seed=1, duration_s=120).metrics
    # a light load decodes nearly alone: a token's time is a step's (x2), a little more as the
    # slower steps overlap more requests
    assert 2.0 <= slow["tpot_mean_ms"] / fast["tpot_mean_ms"] <= 2.5
    assert slow["ttft_mean_ms"] > 1.8 * fast["ttft_mean_ms"]


def test_profile_hash_ignores_the_serving_path() -> None:
    p = load_profile("tiny-llama-cpu")
    assert profile_sha256(p.with_serving_path(None)) == profile_sha256(
        p.with_serving_path(_term()))


def test_fit_recovers_a_planted_term() -> None:
    """Measurements made by the twin with a known term (steps x1.5 with 0.05 ms more per
    prefill token, + 0.4 ms per decoding sequence, a TTFT line) over a light and a heavier
    window: the fit, given only them and the plain profile, finds the term back."""
    w = Workload.from_yaml("examples/workload_cpu_calibrate.yaml")
    p = load_profile("tiny-llama-cpu").with_serving_path(None)
    cfg = _config(p, w)
    ranks, ids = [a.rank for a in w.adapters], [a.id for a in w.adapters]
    zero = (0.0,) * N
    planted = _term(step_scale=1.5, decode_seq_ms=0.4, prefill_token_ms=0.05, request_ms=14.0,
                    prompt_token_ms=0.0, ttft_noise_ms=zero, itl_noise_ms=zero)
    window = 120.0
    batches = [generate_requests(w.scaled(s), window, seed=5 + k)
               for k, s in enumerate((1.0, 3.0))]
    windows, figures = [], []
    for batch in batches:
        truth = simulate_requests(batch, ranks, cfg, p.with_serving_path(planted), window, ids)
        r = truth.records
        gaps = [[(r.finish_s[i] - r.first_token_s[i]) * 1e3 / (n - 1)] * (n - 1)
                if n > 1 and np.isfinite(r.finish_s[i]) else []
                for i, n in enumerate(batch.output_len)]
        windows.append(MeasuredRequests(batch.prompt_len, batch.output_len, batch.arrival_s,
                                        r.first_token_s, r.finish_s, gaps))
        figures.append(truth.metrics)

    def replay(steps: ServingPath, k: int):
        r = simulate_requests(batches[k], ranks, cfg, p.with_serving_path(steps), window, ids)
        return r.records.first_token_s, r.records.finish_s, r.metrics

    fit = fit_term(windows, figures, replay)
    assert fit.step_scale == pytest.approx(1.5, rel=0.15), fit.describe()
    assert fit.decode_seq_ms == pytest.approx(0.4, abs=0.3), fit.describe()
    assert fit.prefill_token_ms == pytest.approx(0.05, abs=0.03), fit.describe()
    assert fit.request_ms == pytest.approx(14.0, abs=4.0), fit.describe()
    assert fit.fitted_on == int(np.isfinite(windows[0].first_token_s).sum())
    few = MeasuredRequests(*(getattr(windows[0], f)[:5] for f in (
        "prompt_len", "output_len", "send_s", "first_token_s", "finish_s")),
        windows[0].gaps_ms[:5])
    with pytest.raises(ServingPathError, match="need 20"):
        fit_serving_path(few, fit, few.first_token_s)
