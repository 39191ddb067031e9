"""The whole live-engine loop on this machine: build the tiny model, profile a real CPU vLLM,
calibrate a profile, benchmark workloads on the real engine, replay them in the twin.

Bound. Two measured noises limit what the twin can achieve, and the test measures both:
- the engine's run-to-run noise: every workload is benchmarked twice with the same requests
  (same seed); the SMAPE between the two runs;
- the step model's own error: its SMAPE on held-out profiling runs (steps of identical
  composition vary 10-25 % on this shared 2-core machine, docs/live_profile.md), which carries
  over to throughput, the inverse of step time, on a saturated engine.
The twin's throughput SMAPE against the mean of the two runs must stay within
max(3 x run-to-run SMAPE, held-out step SMAPE) on the light workload, which the engine serves in
full. The saturated one (at most 4 running requests) is measured and printed but its throughput
is not asserted yet: the profiler times steps in-process, while `bench` serves through
AsyncLLM, whose frontend and inter-process cost per step the twin does not model; the twin's
saturated throughput was 5-23 % high in our runs depending on how fast the shared machine was
(open in issue #3). What is asserted there: the engine really saturates — its requests queue,
TTFT over 10x the light workload's (whether it also serves under 90 % of the offered tokens,
"starved", depends on how fast the shared machine is at the moment: one CI run served 1.9 k
tok/s, not starved, and the twin agreed) — and the twin gives one answer for the two runs of
the same requests.
"""

from __future__ import annotations

import pytest

from orchestrator.measure.loop import run_live_loop


@pytest.mark.integration
def test_profile_calibrate_bench_validate_on_a_live_engine(tmp_path):
    # the full sweep (≈ 100 s: a no-LoRA engine, more batch shapes): fitted on the quick one the
    # twin missed the saturated throughput by 10-13 % in our runs, on the full one by 4 %
    out = run_live_loop(tmp_path, quick=False, window_s=30.0, repeats=2, log=print)
    assert out["step_fit_held_out"]["steps"] > 200
    step_smape = out["step_fit_held_out"]["smape_pct"]
    light, saturated = out["workloads"]["cpu-light"], out["workloads"]["cpu-saturated"]
    print("cpu-light", light)
    print("cpu-saturated", saturated)
    assert not light["measured_starved"] and not light["twin_starved"]
    bound = max(3 * light["run_to_run_smape_total_throughput_tps"], step_smape)
    assert light["smape_total_throughput_tps"] <= bound, (light, bound)
    assert min(saturated["measured_ttft_mean_ms"]) > 10 * max(light["measured_ttft_mean_ms"]), (
        saturated, light)
    table = out["predictions"]
    twin = table.loc[table["workload"] == "cpu-saturated", "twin_total_throughput_tps"]
    assert twin.nunique() == 1
