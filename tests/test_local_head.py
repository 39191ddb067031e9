"""The private Ray head lorafleet starts: its workers serve at the default CPU priority."""

from __future__ import annotations

import os

import pytest


@pytest.mark.integration
def test_workers_run_at_the_default_priority(ray_cluster) -> None:
    """Ray's default starts workers at nice 15: ingress, engines and controller then lose the
    CPU to any ordinary busy process (the load generator itself), and the ingress stalls."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    @ray.remote(num_cpus=0)
    class Probe:
        def niceness(self) -> int:
            return os.nice(0)

    probe = Probe.remote()
    try:
        assert ray.get(niceness.remote(), timeout=120) == 0
        assert ray.get(probe.niceness.remote(), timeout=120) == 0
    finally:
        ray.kill(probe)


def test_the_callers_niceness_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.control.cluster import ray_env

    assert ray_env()["RAY_worker_niceness"] == "0"
    monkeypatch.setenv("RAY_worker_niceness", "5")
    assert ray_env()["RAY_worker_niceness"] == "5"
