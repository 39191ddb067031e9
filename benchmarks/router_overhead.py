"""What the routing layer costs: latency through the ingress vs a direct call of the same replica.

One run, one private Ray head, one ``sim`` replica group (the engine's step time scaled down so
the engine itself is not what is measured). Interleaved, request by request, with identical
bodies (1-token completions):

* ``direct``: the driver calls the engine replica's Serve handle (``complete``);
* ``http``:   the driver POSTs ``/v1/completions``: Serve's HTTP proxy -> ingress deployment
  (FastAPI, auth, routing table, least-loaded copy) -> the same engine handle;
* ``in_process``: the ingress's FastAPI app over an in-process replica (httpx ASGI transport)
  vs calling that replica directly - the routing code alone, without Ray or sockets.

Then the request rate one ingress replica sustains (closed loop, ``--concurrency`` clients, for
``--seconds``). Prints one JSON line. The routing layer's target: <= 1 ms added at p50.

``--direct-ingress`` runs the cluster with Ray Serve's experimental direct ingress
(``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``): no HTTP proxy actor, the ingress replica serves HTTP
itself, which removes one process hop from the ``http`` path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.engine_backend import GenerateRequest  # noqa: E402
from orchestrator.synthetic_plan import GroupShape, split_adapters, synthetic_plan  # noqa: E402


def _p(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


async def _in_process(plan_path: str, n: int, scale: float) -> dict[str, float]:
    from orchestrator.ingress import IngressCore, build_api
    from orchestrator.replica import LocalClient, ReplicaCore
    from orchestrator.serving_spec import ServingSpec

    spec = ServingSpec.from_args({"plan_path": plan_path, "engine": "sim",
                                  "sim_time_scale": scale})
    cores = {r.replica_id: ReplicaCore(r) for r in spec.replica_specs()}
    for c in cores.values():
        await c.start()
    core = IngressCore(spec.routing_table(), {k: LocalClient(v) for k, v in cores.items()},
                       engine="sim")
    body = {"model": "adapter-0000", "prompt": [11, 12, 13, 14], "max_tokens": 1}
    rid = next(iter(cores))
    direct, api = [], []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(core)),
                                 base_url="http://x") as client:
        for i in range(n):
            t = time.perf_counter()
            await cores[rid].complete(GenerateRequest(f"d{i}", "adapter-0000", 1,
                                                      prompt_token_ids=(11, 12, 13, 14)))
            direct.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = await client.post("/v1/completions", json=body)
            api.append(time.perf_counter() - t)
            assert r.status_code == 200
    for c in cores.values():
        await c.stop()
    return {"in_process_direct_p50_ms": _p(direct, 50), "in_process_api_p50_ms": _p(api, 50),
            "in_process_overhead_p50_ms": _p(api, 50) - _p(direct, 50)}


async def _through_serve(url: str, n: int, concurrency: int, seconds: float) -> dict:
    from ray import serve

    handle = serve.get_deployment_handle("engine-group-0-0", app_name="lorafleet")
    h = handle.options(method_name="complete")
    body = {"model": "adapter-0000", "prompt": [11, 12, 13, 14], "max_tokens": 1}
    direct, http = [], []
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        for i in range(20):  # warm both paths (connections, handle's replica cache)
            await h.remote(GenerateRequest(f"w{i}", "adapter-0000", 1, prompt_token_ids=(11,)))
            await client.post("/v1/completions", json=body)
        for i in range(n):
            t = time.perf_counter()
            res = await h.remote(GenerateRequest(f"d{i}", "adapter-0000", 1,
                                                 prompt_token_ids=(11, 12, 13, 14)))
            direct.append(time.perf_counter() - t)
            assert "error" not in res
            t = time.perf_counter()
            r = await client.post("/v1/completions", json=body)
            http.append(time.perf_counter() - t)
            assert r.status_code == 200 and r.headers["x-lorafleet-replica"] == "group-0/0"
        # sustained rate of one ingress replica: closed loop, `concurrency` clients
        done, errors = 0, 0
        stop = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal done, errors
            j = 0
            while time.perf_counter() < stop:
                r = await client.post("/v1/completions",
                                      json={**body, "model": f"adapter-{(k + j) % 8:04d}"})
                j += 1
                if r.status_code == 200:
                    done += 1
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "direct_handle_p50_ms": _p(direct, 50), "direct_handle_p99_ms": _p(direct, 99),
        "ingress_http_p50_ms": _p(http, 50), "ingress_http_p99_ms": _p(http, 99),
        "ingress_overhead_p50_ms": _p(http, 50) - _p(direct, 50),
        "ingress_overhead_p50_paired_ms": 1e3 * statistics.median(
            [a - b for a, b in zip(http, direct, strict=True)]),
        "ingress_sustained_rps": done / elapsed, "sustained_errors": errors,
        "sustained_concurrency": concurrency,
    }


def _direct_port(first: int, timeout_s: float = 60.0) -> int:
    """The port the ingress replica serves on (Serve allocates it from the configured range)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in range(first, first + 21):
            try:
                if httpx.get(f"http://127.0.0.1:{p}/health", timeout=2).status_code == 200:
                    return p
            except httpx.HTTPError:
                continue
        time.sleep(1)
    raise RuntimeError(f"no direct-ingress server answered on ports {first}-{first + 20}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="latency samples per path")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0, help="sustained-rate window")
    ap.add_argument("--time-scale", type=float, default=100.0,
                    help="sim engine speed-up (engine time out of the measurement)")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="Serve's experimental direct ingress: no proxy hop (module notes)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    flags: dict[str, str] = {}
    if args.direct_ingress:
        from orchestrator.deploy import free_port as _free

        first = _free()
        flags = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                 "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first),
                 "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first + 20)}
        os.environ.update(flags)  # the driver's Serve client reads the flag too
    from orchestrator.deploy import LocalHead, connect, free_port
    from orchestrator.serve_app import run_application
    from orchestrator.serving_spec import ServingSpec

    tmp = Path(tempfile.mkdtemp(prefix="lf-router-"))
    plan = synthetic_plan([GroupShape("group-0", split_adapters(8, 1)[0], max_num_seqs=256,
                                      max_num_batched_tokens=2048)])
    plan.to_yaml(tmp / "plan.yaml")
    out: dict = {"benchmark": "router_overhead", "engine": "sim", "requests": args.requests,
                 "sim_time_scale": args.time_scale,
                 "http_path": "direct_ingress" if args.direct_ingress else "serve_proxy"}
    out.update(asyncio.run(_in_process(str(tmp / "plan.yaml"), args.requests, args.time_scale)))
    head = LocalHead.start(num_cpus=4, env=flags)
    try:
        import ray
        from ray import serve

        connect(head.address)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t = time.perf_counter()
        run_application(ServingSpec.from_args({"plan_path": str(tmp / "plan.yaml"),
                                               "engine": "sim",
                                               "sim_time_scale": args.time_scale}))
        out["deploy_s"] = time.perf_counter() - t
        if args.direct_ingress:
            port = _direct_port(int(flags["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]))
        out.update(asyncio.run(_through_serve(f"http://127.0.0.1:{port}", args.requests,
                                              args.concurrency, args.seconds)))
        serve.shutdown()
        ray.shutdown()
    finally:
        head.stop()
    out["target_overhead_p50_ms"] = 1.0
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
