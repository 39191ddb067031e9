"""`lorafleet` CLI: thin wrappers, user errors exit 2 with a message, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = str(ROOT / "examples" / "workload_small.yaml")
SIM_KEYS = {
    "total_throughput_tps", "input_throughput_tps", "output_throughput_tps",
    "request_throughput_rps", "completed", "ttft_mean_ms", "ttft_p99_ms", "tpot_mean_ms",
    "itl_mean_ms", "itl_p99_ms", "starved", "simulated_s", "wall_s",
}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables wrap at the terminal width; give them room so names stay on one line."""
    from rich.console import Console

    import orchestrator.cli.output as cli

    monkeypatch.setattr(cli, "console", Console(width=200))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("profile", ["llama-3.1-8b-instruct", "qwen-2.5-7b-instruct"])
def test_simulate_json_has_the_documented_keys(capsys, profile):
    code, out, _ = run_cli(
        capsys, "simulate", SMALL, "--profile", profile, "--max-loras", "4",
        "--max-cpu-loras", "8", "--duration", "300", "--seed", "1", "--json",
    )
    assert code == 0
    obj = json.loads(out)
    assert set(obj) >= SIM_KEYS
    assert obj["simulated_s"] == pytest.approx(300, rel=0.01)
    assert obj["completed"] > 0


def test_simulate_prints_a_table(capsys):
    code, out, _ = run_cli(
        capsys, "simulate", SMALL, "--profile", "llama-3.1-8b-instruct", "--max-loras", "4",
        "--duration", "120",
    )
    assert code == 0
    assert "total throughput" in out and "TTFT mean" in out


def test_infeasible_config_exits_2_and_says_what_fits(capsys):
    code, _, err = run_cli(
        capsys, "simulate", SMALL, "--profile", "llama-3.1-8b-instruct", "--max-loras", "384",
        "--max-lora-rank", "32",
    )
    assert code == 2
    assert "What fits" in err and "max_loras <=" in err


def test_unknown_profile_and_bad_workload_are_clear_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", SMALL, "--profile", "a100-nope", "--max-loras", "2")
    assert code == 2 and "no profile named" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapters:\n  - {id: a, rank: -3, rate_rps: 1}\n")
    code, _, err = run_cli(capsys, "simulate", str(bad), "--profile", "llama-3.1-8b-instruct",
                           "--max-loras", "2")
    assert code == 2 and "rank" in err


def test_profiles_lists_the_shipped_profiles(capsys):
    code, out, _ = run_cli(capsys, "profiles")
    assert code == 0
    assert "llama-3.1-8b-instruct" in out and "qwen-2.5-7b-instruct" in out


def test_calibrate_writes_a_loadable_profile(capsys, tmp_path):
    out_path = tmp_path / "qwen.yaml"
    code, out, _ = run_cli(
        capsys, "calibrate", str(ROOT / "data/reference/vllm-0.8.5-h100"), "--model",
        "qwen-2.5-7b-instruct", "-o", str(out_path), "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["held_out"]["smape_pct"] < 3.0
    code, out, _ = run_cli(capsys, "simulate", SMALL, "--profile", str(out_path),
                           "--max-loras", "4", "--duration", "60", "--json")
    assert code == 0 and json.loads(out)["completed"] > 0


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "lorafleet"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for cmd in ("simulate", "calibrate", "profiles", "demo"):
        assert cmd in res.stdout
