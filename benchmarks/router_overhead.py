"""What the routing layer costs: latency through the ingress vs a direct call of the same replica.

One run, one private Ray head, one ``sim`` replica group (the engine's step time scaled down so
the engine itself is not what is measured). Interleaved, request by request, with identical
bodies (1-token completions):

* ``direct``: the driver calls the engine replica's Serve handle the way the ingress does
  (``HANDLE_TRANSPORT``: the replica's gRPC server, pickled);
* ``listener``: the driver POSTs ``/v1/completions`` to the ingress's own listener
  (orchestrator/serving/listener.py): FastAPI, auth, routing table, least-loaded copy -> the
  same handle;
* ``direct_by_reference``: the handle with Serve's default transport (Ray's object store);
* ``listener_httpx``: ``listener`` with httpx, the client of load_tests/openloop (aiohttp is the
  leaner client and the headline's);
* ``serve_proxy``: the same API through Ray Serve's HTTP proxy (proxy -> ingress -> handle);
* ``in_process``: the ingress's FastAPI app over an in-process replica (httpx ASGI transport)
  vs calling that replica directly - the routing code alone, without Ray or sockets.

Then the request rate one ingress replica sustains through its listener (closed loop,
``--concurrency`` clients, for ``--seconds``). Prints one JSON line. The routing layer's target:
<= 1 ms added at p50 (``ingress_overhead_p50_ms``: listener minus direct).
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
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.serving.backend import GenerateRequest  # noqa: E402
from placement.synthetic import GroupShape, split_adapters, synthetic_plan  # noqa: E402


def _p(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


async def _in_process(plan_path: str, n: int, scale: float) -> dict[str, float]:
    from orchestrator.serving.ingress import IngressCore, build_api
    from orchestrator.serving.replica import LocalClient, ReplicaCore
    from orchestrator.serving.spec import ServingSpec

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


async def _through_serve(listener: str, proxy: str, n: int, concurrency: int,
                         seconds: float) -> dict:
    import aiohttp
    from ray import serve

    from orchestrator.serving.app import HANDLE_TRANSPORT

    handle = serve.get_deployment_handle("engine-group-0-0", app_name="lorafleet")
    # as the ingress calls it: the replica's acceptance, then the whole completion
    h = handle.options(method_name="stream", stream=True, **HANDLE_TRANSPORT)
    h_ref = handle.options(method_name="stream", stream=True)  # Serve's default transport
    body = {"model": "adapter-0000", "prompt": [11, 12, 13, 14], "max_tokens": 1}
    times: dict[str, list[float]] = {k: [] for k in (
        "direct", "listener", "direct_by_reference", "listener_httpx", "serve_proxy")}
    conn = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=conn) as session, \
            httpx.AsyncClient(timeout=60) as hx:

        async def post(base: str, model: str = "adapter-0000") -> str:
            async with session.post(f"{base}/v1/completions",
                                    json={**body, "model": model}) as r:
                await r.read()
                assert r.status == 200, r.status
                return r.headers["x-lorafleet-replica"]

        async def post_httpx() -> str:
            r = await hx.post(f"{listener}/v1/completions", json=body)
            assert r.status_code == 200
            return r.headers["x-lorafleet-replica"]

        def req(i: int) -> GenerateRequest:
            return GenerateRequest(f"d{i}", "adapter-0000", 1, prompt_token_ids=(11, 12, 13, 14))

        async def direct(i: int, via: Any) -> dict:
            out: dict = {}
            async for item in via.remote(req(i), True):
                out.update(item)
            return out

        calls = {"direct": lambda i: direct(i, h),
                 "listener": lambda i: post(listener),
                 "direct_by_reference": lambda i: direct(i, h_ref),
                 "listener_httpx": lambda i: post_httpx(),
                 "serve_proxy": lambda i: post(proxy)}
        for i in range(20):  # warm every path (connections, the handles' replica caches)
            for call in calls.values():
                await call(i)
        for i in range(n):  # interleaved, request by request
            for name, call in calls.items():
                t = time.perf_counter()
                out = await call(i)
                times[name].append(time.perf_counter() - t)
                if name.startswith("direct"):
                    assert "error" not in out
                else:
                    assert out == "group-0/0"
        # sustained rate of one ingress replica: closed loop, `concurrency` clients
        done, errors = 0, 0
        stop = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal done, errors
            j = 0
            while time.perf_counter() < stop:
                try:
                    await post(listener, f"adapter-{(k + j) % 8:04d}")
                    done += 1
                except AssertionError:
                    errors += 1
                j += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    d = times["direct"]
    out = {f"{k}_p50_ms": _p(v, 50) for k, v in times.items()}
    out.update({f"{k}_p99_ms": _p(v, 99) for k, v in times.items()})
    out.update({
        "ingress_overhead_p50_ms": _p(times["listener"], 50) - _p(d, 50),
        "ingress_overhead_p50_paired_ms": 1e3 * statistics.median(
            [a - b for a, b in zip(times["listener"], d, strict=True)]),
        "ingress_overhead_httpx_p50_ms": _p(times["listener_httpx"], 50) - _p(d, 50),
        "serve_proxy_overhead_p50_ms": _p(times["serve_proxy"], 50) - _p(d, 50),
        "ingress_sustained_rps": done / elapsed, "sustained_errors": errors,
        "sustained_concurrency": concurrency,
    })
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="latency samples per path")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0, help="sustained-rate window")
    ap.add_argument("--time-scale", type=float, default=100.0,
                    help="sim engine speed-up (engine time out of the measurement)")
    ap.add_argument("--caller-router", choices=("own-loop", "separate-loop"),
                    default="own-loop",
                    help="where the driver's handle router runs: on the caller's event loop, "
                    "like the ingress's (like for like), or Serve's default separate loop")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # read when ray.serve is first imported, below
    os.environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] = \
        "0" if args.caller_router == "own-loop" else "1"
    from orchestrator.control.cluster import LocalHead, connect, free_port
    from orchestrator.control.deploy import wait_http
    from orchestrator.serving.app import run_application
    from orchestrator.serving.spec import ServingSpec

    tmp = Path(tempfile.mkdtemp(prefix="lf-router-"))
    plan = synthetic_plan([GroupShape("group-0", split_adapters(8, 1)[0], max_num_seqs=256,
                                      max_num_batched_tokens=2048)])
    plan.to_yaml(tmp / "plan.yaml")
    out: dict = {"benchmark": "router_overhead", "engine": "sim", "requests": args.requests,
                 "sim_time_scale": args.time_scale, "client": "aiohttp",
                 "caller_router": args.caller_router}
    out.update(asyncio.run(_in_process(str(tmp / "plan.yaml"), args.requests, args.time_scale)))
    import ray
    from ray import serve

    head = LocalHead.start(num_cpus=4)
    try:
        connect(head.address)
        proxy_port, listen_port = free_port(), free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
        t = time.perf_counter()
        run_application(ServingSpec.from_args({"plan_path": str(tmp / "plan.yaml"),
                                               "engine": "sim",
                                               "sim_time_scale": args.time_scale,
                                               "listen": f"127.0.0.1:{listen_port}"}))
        listener = f"http://127.0.0.1:{listen_port}"
        wait_http(f"{listener}/health", timeout_s=60)
        out["deploy_s"] = time.perf_counter() - t
        out.update(asyncio.run(_through_serve(listener, f"http://127.0.0.1:{proxy_port}",
                                              args.requests, args.concurrency, args.seconds)))
    finally:  # no serve.shutdown(): the handles' routers may be bound to a closed loop, and
        # the head goes anyway; Ray first, or its GCS watchdog kills this process
        ray.shutdown()
        head.stop()
    out["target_overhead_p50_ms"] = 1.0
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
