"""`lorafleet bench`: request plan, metric delegation, runs-row format, CSV append, CLI wrapper,
and one real vLLM (CPU) bench of the tiny model."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from orchestrator.measure import bench as live_bench
from orchestrator.measure.bench import (
    ERROR_TAG,
    FIRST_PROMPT_TOKEN,
    MEASURED_COLUMNS,
    PROGRESS_TAG,
    RESULT_TAG,
    BenchConfig,
    BenchError,
    Measurement,
    add_parser,
    append_row,
    build_row,
    measured_metrics,
    prepare,
)
from orchestrator.measure.tiny_model import build_tiny_model
from twin import runs_table
from twin.metrics import aggregate_metrics
from twin.runs_table import jsonable
from twin.validate import REQUIRED_COLUMNS, load_runs, run_workload
from twin.workload import Workload, generate_requests

WORKLOAD_YAML = textwrap.dedent(
    """
    name: tiny-live
    duration_s: 20
    lengths: {kind: lognormal, prompt_mean: 48, prompt_std: 16, output_mean: 24,
              output_std: 8, max_total: 160}
    adapters:
      - {id: adapter-0000, rank: 8, rate_rps: 0.5}
      - {id: adapter-0001, rank: 16, rate_rps: 0.4}
      - {id: adapter-0002, rank: 8, rate_rps: 0.3}
    """
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", n_adapters=4,
                            ranks=(8, 16))


def write_workload(folder: Path, text: str = WORKLOAD_YAML, name: str = "wl.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def make_config(tmp_path: Path, tiny, **kw) -> BenchConfig:
    if "workload" not in kw:
        kw["workload"] = write_workload(tmp_path)
    return BenchConfig(**{"model": tiny.root, "max_loras": 4, "out": tmp_path / "runs.csv", **kw})


def fake_measurement(plan, unfinished: int = 1) -> Measurement:
    """Every request: sent on time, 50 ms TTFT, 10 ms per further token; the last
    ``unfinished`` ones are still running at the window end (aborted)."""
    b = plan.batch
    n = len(b)
    first = b.arrival_s + 0.05
    finish = first + (b.output_len - 1) * 0.01
    generated = b.output_len.astype(np.int64).copy()
    finish[n - unfinished:] = np.nan
    generated[n - unfinished:] = 1
    gaps = [[10.0] * (int(o) - 1) for o in b.output_len]
    for i in range(n - unfinished, n):
        gaps[i] = []
    return Measurement(
        window_s=plan.window_s, send_s=b.arrival_s.copy(), first_token_s=first,
        finish_s=finish, generated=generated, failed=np.zeros(n, dtype=bool), itl_gaps_ms=gaps,
        engine={"kv_cache_tokens": 1_048_576, "engine_start_s": 11.5, "vllm_version": "0.32.0",
                "machine": "cpu test x2", "max_num_seqs": 128, "max_num_batched_tokens": 2048,
                "aborted_requests": unfinished, "failed_requests": 0},
    )


# ----------------------------------------------------------------------------- plan
def test_plan_is_exactly_the_twins_requests(tmp_path, tiny):
    plan = prepare(make_config(tmp_path, tiny, duration_s=30.0, seed=3))
    ref = generate_requests(Workload.from_yaml(plan.config.workload), 30.0, 3)
    for name in ("arrival_s", "adapter", "prompt_len", "output_len"):
        np.testing.assert_array_equal(getattr(plan.batch, name), getattr(ref, name))
    assert plan.window_s == 30.0
    assert [a.id for a in plan.adapters] == ["adapter-0000", "adapter-0001", "adapter-0002"]
    for i in (0, len(ref) - 1):
        ids = plan.prompt_ids(i)
        assert len(ids) == ref.prompt_len[i]
        assert all(FIRST_PROMPT_TOKEN <= t < 2048 for t in ids)
        assert ids == plan.prompt_ids(i)  # seeded: a replay rebuilds the same prompt
    assert plan.prompt_ids(0) != plan.prompt_ids(1)


def test_defaults_follow_the_workload(tmp_path, tiny):
    plan = prepare(make_config(tmp_path, tiny, max_loras=2))
    assert plan.window_s == 20.0  # the workload's duration_s
    assert plan.max_cpu_loras == 3  # max(G, served adapters): every adapter stays cached
    assert plan.max_lora_rank == 16
    assert plan.max_model_len == 512
    assert not plan.warnings


def test_max_model_len_is_raised_only_when_needed(tmp_path, tiny):
    long = WORKLOAD_YAML.replace("prompt_mean: 48", "prompt_mean: 600").replace(
        "max_total: 160", "max_total: 700")
    plan = prepare(make_config(tmp_path, tiny, workload=write_workload(tmp_path, long)))
    need = int((plan.batch.prompt_len + plan.batch.output_len).max())
    assert need > 512 and plan.max_model_len >= need and plan.max_model_len % 256 == 0
    with pytest.raises(BenchError, match="--max-model-len 512"):
        prepare(make_config(tmp_path, tiny, workload=write_workload(tmp_path, long),
                            max_model_len=512))


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        (("adapter-0002", "adapter-0099"), {}, "adapter-0099"),
        (("rank: 16", "rank: 8"), {}, r"adapter-0001 \(workload rank 8, model rank 16\)"),
        (None, {"max_loras": 4, "max_cpu_loras": 2}, "--max-cpu-loras"),
        (None, {"max_lora_rank": 12}, "--max-lora-rank"),
        (None, {"max_lora_rank": 8}, "largest served adapter rank"),
        (None, {"engine": "sglang"}, "--engine"),
        (None, {"duration_s": 0.001}, "no request arrives"),
    ],
)
def test_bad_inputs_name_the_culprit(tmp_path, tiny, change, kwargs, message):
    text = WORKLOAD_YAML if change is None else WORKLOAD_YAML.replace(*change)
    with pytest.raises(BenchError, match=message):
        prepare(make_config(tmp_path, tiny, workload=write_workload(tmp_path, text), **kwargs))


def test_base_requests_with_full_slots_warn(tmp_path, tiny):
    text = WORKLOAD_YAML.replace("duration_s: 20", "duration_s: 20\nbase_model_rate_rps: 0.5")
    plan = prepare(make_config(tmp_path, tiny, workload=write_workload(tmp_path, text),
                               max_loras=3))
    assert (plan.batch.adapter == -1).any()
    assert any("max_loras" in w for w in plan.warnings)


# ----------------------------------------------------------------------------- metrics
def test_metrics_are_the_twins_definitions(tmp_path, tiny):
    plan = prepare(make_config(tmp_path, tiny))
    meas = fake_measurement(plan, unfinished=1)
    m = measured_metrics(plan.batch, meas)
    n = len(plan.batch)
    assert m["completed"] == n - 1 and m["offered_requests"] == n
    assert m["ttft_mean_ms"] == pytest.approx(50.0)
    assert m["itl_median_ms"] == pytest.approx(10.0) and m["itl_mean_ms"] == pytest.approx(10.0)
    done_out = plan.batch.output_len[:-1]
    assert m["total_output_tokens"] == int(done_out.sum())
    assert m["output_throughput_tps"] == pytest.approx(done_out.sum() / plan.window_s)


def test_metrics_delegate_to_aggregate_metrics(tmp_path, tiny, monkeypatch):
    plan = prepare(make_config(tmp_path, tiny))
    meas = fake_measurement(plan, unfinished=2)
    meas.itl_gaps_ms[-1] = [999.0]  # an aborted request's gaps must not be pooled
    calls = []

    def spy(rec, window_s, itl_gap_ms, itl_weight, preempt_gap_ms):
        calls.append((rec, window_s, itl_gap_ms, itl_weight, preempt_gap_ms))
        return aggregate_metrics(rec, window_s, itl_gap_ms, itl_weight, preempt_gap_ms)

    monkeypatch.setattr(runs_table, "aggregate_metrics", spy)
    measured_metrics(plan.batch, meas)
    (rec, window, gaps, weights, preempt), = calls
    assert window == plan.window_s
    expected = int((plan.batch.output_len[:-2] - 1).sum())
    assert len(gaps) == expected and set(gaps) == {10.0}
    np.testing.assert_array_equal(weights, np.ones(expected))
    assert len(preempt) == 0
    np.testing.assert_array_equal(rec.arrival_s, meas.send_s)
    assert not rec.preemptions.any() and not rec.rejected.any()


def test_failed_requests_are_rejected_not_completed(tmp_path, tiny):
    plan = prepare(make_config(tmp_path, tiny))
    meas = fake_measurement(plan, unfinished=0)
    meas.failed[0] = True
    m = measured_metrics(plan.batch, meas)
    assert m["rejected"] == 1 and m["completed"] == len(plan.batch) - 1


# ----------------------------------------------------------------------------- row + CSV
def test_row_has_every_column_validate_needs(tmp_path, tiny):
    plan = prepare(make_config(tmp_path, tiny, seed=5))
    meas = fake_measurement(plan)
    row = build_row(plan, meas, measured_metrics(plan.batch, meas))
    needed = {
        *REQUIRED_COLUMNS, *MEASURED_COLUMNS, "offered_request_rate_rps",
        "offered_total_tps_est", "pool_prompts", "pool_input_tokens", "pool_output_tokens",
        "quality_flag", "max_num_batched_tokens", "workload_json", "seed", "kv_cache_tokens",
        "engine_start_s", "vllm_version", "machine",
    }
    assert needed <= set(row)
    assert row["status"] == "ok" and row["quality_flag"] == ""
    assert row["model"] == "tiny-llama-cpu" and row["workload"] == "tiny-live"
    assert re.fullmatch(r"_4_4_16_s5-\d{8}T\d{6}", row["run"])
    assert json.loads(row["rank_mix"]) == {"8": 2, "16": 1}
    assert json.loads(row["adapter_rate_counts"]) == {"0.3": 1, "0.4": 1, "0.5": 1}
    n = len(plan.batch)
    tokens = int(plan.batch.prompt_len.sum() + plan.batch.output_len.sum())
    assert row["pool_prompts"] == n
    assert row["offered_request_rate_rps"] == pytest.approx(n / 20.0)
    assert row["offered_total_tps_est"] == pytest.approx(tokens / 20.0)
    assert row["seed"] == 5 and row["window_s"] == 20.0
    # workload_json + seed rebuild the exact requests that were served
    rebuilt = generate_requests(Workload.from_dict(json.loads(row["workload_json"])),
                                row["window_s"], row["seed"])
    np.testing.assert_array_equal(rebuilt.arrival_s, plan.batch.arrival_s)
    np.testing.assert_array_equal(rebuilt.output_len, plan.batch.output_len)


def test_append_creates_then_appends_and_validate_can_read(tmp_path, tiny):
    plan = prepare(make_config(tmp_path, tiny))
    meas = fake_measurement(plan)
    row = build_row(plan, meas, measured_metrics(plan.batch, meas))
    out = tmp_path / "sub" / "runs.csv"
    assert append_row(out, row) == 1
    first_text = out.read_text()
    assert append_row(out, {**row, "run": "_4_4_16_second"}) == 2
    assert out.read_text().startswith(first_text)  # the earlier row is untouched
    runs = load_runs(out)
    assert list(runs["run"]) == [row["run"], "_4_4_16_second"]
    assert runs["quality_flag"].isna().all()  # empty: `validate` keeps the rows
    workload, config = run_workload(runs.iloc[0])
    assert len(workload.adapters) == 3 and config.max_loras == 4 and config.max_cpu_loras == 4
    assert json.loads(runs["workload_json"][1])["name"] == "tiny-live"
    assert runs["ttft_mean_ms"][0] == pytest.approx(row["ttft_mean_ms"])


def test_append_widens_an_older_header_and_keeps_its_cells(tmp_path):
    out = tmp_path / "runs.csv"
    out.write_text("model,run,score\nold-model,_1_1_8_,0.10\n")  # no trailing-newline issue
    append_row(out, {"model": "m", "run": "r", "extra": {"8": 1}, "score": float("nan")})
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["model", "run", "score", "extra"]
    assert rows[1] == ["old-model", "_1_1_8_", "0.10", ""]  # verbatim, not re-formatted
    assert rows[2] == ["m", "r", "", '{"8": 1}']
    (tmp_path / "nl.csv").write_text("model,run\na,b")  # last line without newline
    append_row(tmp_path / "nl.csv", {"model": "c", "run": "d"})
    assert (tmp_path / "nl.csv").read_text() == "model,run\na,b\nc,d\n"


# ----------------------------------------------------------------------------- CLI wrapper
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def bench_argv(wl: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", str(wl), "--engine", "vllm", "--model", str(model), "--max-loras", "4",
            "--out", str(out), *extra]


def test_parser_and_child_argv_round_trip(tmp_path, tiny):
    args = make_parser().parse_args(bench_argv(
        tmp_path / "w.yaml", tiny.root, tmp_path / "r.csv", "--max-cpu-loras", "6",
        "--max-lora-rank", "32", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
        "--duration", "12.5", "--seed", "4", "--model-name", "x", "--json"))
    config = BenchConfig.from_args(args)
    assert (config.max_cpu_loras, config.max_lora_rank, config.duration_s) == (6, 32, 12.5)
    child = argparse.ArgumentParser()
    live_bench._add_arguments(child)
    assert BenchConfig.from_args(child.parse_args(config.to_argv())) == config


@pytest.mark.parametrize("bad", [["--max-loras", "0"], ["--duration", "-3"], ["--seed", "x"]])
def test_parser_rejects_bad_numbers(tmp_path, bad, capsys):
    argv = bench_argv(tmp_path / "w.yaml", tmp_path, tmp_path / "r.csv") + bad
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(argv)
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_cmd_bench_fails_fast_without_starting_an_engine(tmp_path, tiny, monkeypatch, capsys):
    def no_child(*a, **k):
        raise AssertionError("no engine process for bad inputs")

    monkeypatch.setattr(live_bench.subprocess, "Popen", no_child)
    wl = write_workload(tmp_path, WORKLOAD_YAML.replace("adapter-0002", "adapter-0042"))
    args = make_parser().parse_args(bench_argv(wl, tiny.root, tmp_path / "r.csv"))
    assert args.func(args) == 2
    assert "adapter-0042" in capsys.readouterr().err
    args = make_parser().parse_args(bench_argv(wl, tmp_path / "nowhere", tmp_path / "r.csv"))
    assert args.func(args) == 2
    assert "adapters.yaml" in capsys.readouterr().err


class FakeChild:
    """Stands in for the engine process: replays canned output lines."""

    def __init__(self, lines: list[str], returncode: int):
        self.stdout = io.StringIO("".join(f"{x}\n" for x in lines))
        self.returncode = returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def terminate(self) -> None:  # pragma: no cover - only on interrupts
        pass


def test_cmd_bench_streams_progress_and_prints_the_result(tmp_path, tiny, monkeypatch, capsys):
    plan = prepare(make_config(tmp_path, tiny))
    meas = fake_measurement(plan)
    row = build_row(plan, meas, measured_metrics(plan.batch, meas))
    payload = jsonable({"row": row, "runs_csv": "R.csv", "row_number": 3})
    lines = [f"{PROGRESS_TAG} engine started in 11.5 s", "INFO some vLLM log line",
             RESULT_TAG + json.dumps(payload)]
    seen = {}

    def popen(cmd, **kw):
        seen["cmd"], seen["env"] = cmd, kw["env"]
        return FakeChild(lines, 0)

    monkeypatch.setattr(live_bench.subprocess, "Popen", popen)
    args = make_parser().parse_args(bench_argv(plan.config.workload, tiny.root, tmp_path / "r"))
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert seen["cmd"][1:3] == ["-m", "orchestrator.measure.bench"]
    assert seen["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "engine started in 11.5 s" in err and "some vLLM log line" not in err
    assert "TTFT mean (ms)" in out and "appended row 3 to R.csv" in out

    args = make_parser().parse_args(
        bench_argv(plan.config.workload, tiny.root, tmp_path / "r", "--json"))
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["row_number"] == 3 and printed["run"] == row["run"]


@pytest.mark.parametrize(
    ("lines", "rc", "expected"),
    [
        ([f"{ERROR_TAG}--max-lora-rank: bad"], 2, "--max-lora-rank: bad"),
        (["Traceback (most recent call last):", "RuntimeError: engine died"], 1,
         "RuntimeError: engine died"),
    ],
)
def test_cmd_bench_reports_child_failures(tmp_path, tiny, monkeypatch, capsys, lines, rc,
                                          expected):
    monkeypatch.setattr(live_bench.subprocess, "Popen", lambda *a, **k: FakeChild(lines, rc))
    wl = write_workload(tmp_path)
    args = make_parser().parse_args(bench_argv(wl, tiny.root, tmp_path / "r.csv"))
    assert args.func(args) == 2
    assert expected in capsys.readouterr().err


# ----------------------------------------------------------------------------- real vLLM
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_live_bench_on_vllm_cpu(tmp_path, capsys):
    """Two real benches of the tiny model (3 adapters, ~1.2 req/s, short requests) append two
    rows whose figures are sane; lightly loaded, throughput is the offered load."""
    model = build_tiny_model(tmp_path / "tiny", n_adapters=4, ranks=(8, 16))
    wl = write_workload(tmp_path)
    out = tmp_path / "runs.csv"
    parser = make_parser()

    args = parser.parse_args(bench_argv(wl, model.root, out, "--duration", "20", "--seed", "1"))
    assert args.func(args) == 0, capsys.readouterr().err
    printed, progress = capsys.readouterr()
    with capsys.disabled():  # shown with -s: the engine timings and the measured table
        print(progress + printed)
    assert "engine started in" in progress and "TTFT mean (ms)" in printed
    runs = load_runs(out)
    assert len(runs) == 1
    r = runs.iloc[0]
    assert 0 < r["completed"] <= r["offered_requests"] == r["pool_prompts"]
    for col in ("ttft_mean_ms", "ttft_p99_ms", "tpot_mean_ms", "itl_mean_ms", "itl_median_ms",
                "itl_p99_ms", "engine_start_s"):
        assert math.isfinite(r[col]) and r[col] > 0, col
    assert r["failed_requests"] == 0 and r["kv_cache_tokens"] > 0
    assert r["total_throughput_tps"] == pytest.approx(r["offered_total_tps_est"], rel=0.25)
    assert r["vllm_version"] and r["machine"].startswith("cpu")

    args = parser.parse_args(bench_argv(wl, model.root, out, "--duration", "8", "--seed", "2",
                                        "--json"))
    assert args.func(args) == 0, capsys.readouterr().err
    second = json.loads(capsys.readouterr().out)
    runs = load_runs(out)
    assert len(runs) == 2 and runs["run"][1] == second["run"] and second["row_number"] == 2
    assert runs["seed"].tolist() == [1, 2] and second["completed"] > 0
