"""The controller's transition with real vLLM replicas (CPU build, tiny generated model): two
engines under an open-loop load swap adapters. The engine configs match, so both are re-targeted
in place (adapters registered with the running vLLM engines, no restart), the routing table is
swapped atomically, and not one request fails while adapters move between replicas."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import numpy as np
import pytest

from orchestrator.measure.bench import dispatch_open_loop
from orchestrator.serving.ingress import REPLICA_HEADER
from placement.synthetic import GroupShape, synthetic_plan

pytestmark = pytest.mark.integration
BEFORE = {"group-a": [("adapter-0000", 8), ("adapter-0001", 16)],
          "group-b": [("adapter-0002", 8), ("adapter-0003", 16)]}
AFTER = {"group-a": [("adapter-0000", 8), ("adapter-0003", 16)],  # same rank mix per group,
         "group-b": [("adapter-0002", 8), ("adapter-0001", 16)]}  # so the same engine config
IDS = [a for g in BEFORE.values() for a, _ in g]


async def load(url: str, seconds: float, rate: float) -> list[tuple[float, str, int, str]]:
    rng = np.random.default_rng(3)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(seconds * rate * 1.5)))
    arrivals = arrivals[arrivals < seconds]
    out: list[tuple[float, str, int, str]] = []
    tasks: list[asyncio.Task] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        t0 = time.monotonic()

        async def one(i: int) -> None:
            adapter = IDS[i % len(IDS)]
            t = time.monotonic() - t0
            try:
                r = await client.post("/v1/completions", json={
                    "model": adapter, "prompt": "move me", "max_tokens": 8, "ignore_eos": True})
                out.append((t, adapter, r.status_code, r.headers.get(REPLICA_HEADER, "")))
            except httpx.HTTPError as exc:
                out.append((t, adapter, -1, type(exc).__name__))

        await dispatch_open_loop(arrivals, t0, time.monotonic, one, tasks)
        await asyncio.gather(*tasks)
    return out


def test_vllm_replicas_swap_adapters_under_load_without_a_failed_request(
        ray_cluster, tmp_path) -> None:
    import ray
    from ray import serve

    from orchestrator.control.actor import start_controller
    from orchestrator.control.controller import ControllerSettings
    from orchestrator.measure.tiny_model import build_tiny_model
    from orchestrator.serving.spec import ServingSpec

    build_tiny_model(tmp_path / "tiny", n_adapters=4, ranks=(8, 16))
    synthetic_plan([GroupShape(g, a) for g, a in BEFORE.items()]).to_yaml(tmp_path / "p.yaml")
    after = synthetic_plan([GroupShape(g, a) for g, a in AFTER.items()])
    spec = ServingSpec.from_args({"plan_path": str(tmp_path / "p.yaml"), "engine": "vllm",
                                  "model": str(tmp_path / "tiny")})
    actor = start_controller(spec, ControllerSettings(), name="test-controller-vllm")
    try:
        before = ray.get(actor.status.remote())
        assert before["replanning"].startswith("re-planning is off")  # hand-made plan
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(asyncio.run, load(ray_cluster.url, 40.0, 2.0))
            time.sleep(10)
            result = ray.get(actor.apply_plan.remote(after.to_dict()), timeout=600)
            results = running.result(timeout=600)
        assert result["ok"], result
        assert result["retargeted"] == 2 and result["started"] == 0 and result["stopped"] == 0
        assert [s for _, _, s, _ in results] == [200] * len(results)
        late = [(a, rep) for t, a, _, rep in results if t > 10 + result["seconds"] + 2]
        assert late, "no request after the transition"
        where = {g: {a for a, _ in ads} for g, ads in AFTER.items()}
        for adapter, replica in late:
            assert adapter in where[replica.split("/")[0]], (adapter, replica)
        status = ray.get(actor.status.remote())
        assert status["version"] == before["version"] + 1
        assert set(status["members"]) == set(before["members"])  # no engine restarted
    finally:
        try:
            ray.get(actor.shutdown.remote(), timeout=300)
        finally:
            ray.kill(actor, no_restart=True)
            serve.delete("lorafleet")
