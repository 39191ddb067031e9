"""The serving edge, in process (the FastAPI app over sim replicas, ASGI called directly): body
limits answered 413 naming the limit, every answer counted in the metrics (those the ingress
gives itself too), a client that goes away aborting its engine request streamed or not, the chat
stream's role chunk going out with the first output, adapter residency exported."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest

from orchestrator.serving.api_keys import ApiKeys
from orchestrator.serving.ingress import (
    CLIENT_GONE,
    IngressCore,
    OpenStream,
    _sse,
    _Target,
    build_api,
)
from orchestrator.serving.openai_schema import MAX_BODY_BYTES
from orchestrator.serving.registry import AdapterRegistry
from orchestrator.serving.replica import LocalClient, ReplicaCore
from orchestrator.serving.routing import ReplicaId, RoutingTable
from orchestrator.serving.spec import ReplicaSpec, ServingSpec, SpecError
from placement.synthetic import GroupShape, synthetic_plan

PLAN = synthetic_plan([GroupShape("g", [("a", 8), ("b", 8)])])


def _core(time_scale: float = 20.0, **kw) -> tuple[IngressCore, ReplicaCore]:
    g = PLAN.groups[0]
    reg = AdapterRegistry.ranks_only({a.id: a.rank for a in g.adapters})
    replica = ReplicaCore(ReplicaSpec(g.name, 0, "sim", g.engine, reg.subset(g.adapter_ids),
                                      "sim", sim_time_scale=time_scale))
    core = IngressCore(RoutingTable.from_plan(PLAN), {ReplicaId("g", 0): LocalClient(replica)},
                       engine="sim", **kw)
    return core, replica


def _client(core: IngressCore) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(core)),
                             base_url="http://lorafleet")


def _counted(metrics: str) -> dict[tuple[str, str, str], float]:
    out = {}
    for m in re.finditer(r'lorafleet_requests_total\{model="([^"]*)",replica="([^"]*)",'
                         r'status="(\d+)"\} ([0-9.]+)', metrics):
        out[m.group(1), m.group(2), m.group(3)] = float(m.group(4))
    return out


def test_a_body_over_the_limit_is_413_naming_it(tmp_path: Path) -> None:
    async def run() -> None:
        core, replica = _core(max_body_bytes=4096)
        await replica.start()
        async with _client(core) as client:
            big = {"model": "a", "prompt": "x" * 5000, "max_tokens": 2}
            r = await client.post("/v1/completions", json=big)
            assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]

            async def chunks():  # no Content-Length: counted as it streams
                body = json.dumps(big).encode()
                for i in range(0, len(body), 1000):
                    yield body[i:i + 1000]

            r = await client.post("/v1/completions", content=chunks(),
                                  headers={"content-type": "application/json"})
            assert r.status_code == 413 and "max_body_bytes" in r.text
            r = await client.post("/v1/completions", json={**big, "prompt": "x" * 100})
            assert r.status_code == 200, r.text  # under the limit: served
            counted = _counted((await client.get("/metrics")).text)
        assert counted[("unknown", "none", "413")] == 2
        assert counted[("a", "g/0", "200")] == 1
        assert replica.telemetry.total_requests == 1  # the refused ones never reached it

    asyncio.run(run())
    with pytest.raises(ValueError, match="max_body_bytes"):
        IngressCore(RoutingTable.from_plan(PLAN), {}, engine="sim",
                    max_body_bytes=MAX_BODY_BYTES + 1)
    path = tmp_path / "plan.yaml"
    PLAN.to_yaml(path)
    with pytest.raises(SpecError, match="max_body_bytes"):
        ServingSpec.from_args({"plan_path": str(path), "engine": "sim",
                               "max_body_bytes": 8 * 2**20})
    assert ServingSpec.from_args({"plan_path": str(path), "engine": "sim",
                                  "max_body_bytes": 10_000}).max_body_bytes == 10_000


def test_every_answer_is_counted_with_its_model_when_served() -> None:
    async def run() -> dict:
        core, replica = _core(api_keys=ApiKeys.from_dict(
            {"keys": [{"key": "sk-1", "tenant": "t", "adapters": ["a"]}]}))
        await replica.start()
        ok = {"authorization": "Bearer sk-1"}
        async with _client(core) as client:
            statuses = [
                (await client.post("/v1/completions", json={"model": "a", "prompt": "x",
                                                            "max_tokens": 2})).status_code,
                (await client.post("/v1/completions", headers=ok, json={
                    "model": "ghost", "prompt": "x"})).status_code,
                (await client.post("/v1/completions", headers=ok, json={
                    "model": "b", "prompt": "x"})).status_code,
                (await client.post("/v1/completions", headers=ok, json={
                    "model": "a", "prompt": "x", "max_tokens": -1})).status_code,
                (await client.post("/v1/completions", headers=ok, content=b"{nope",
                                   )).status_code,
                (await client.post("/v1/completions", headers=ok, json={
                    "model": "a", "prompt": "x", "max_tokens": 2})).status_code,
            ]
            assert statuses == [401, 404, 403, 400, 400, 200]
            return _counted((await client.get("/metrics")).text)

    counted = asyncio.run(run())
    assert counted == {("a", "none", "401"): 1, ("unknown", "none", "404"): 1,
                       ("b", "none", "403"): 1, ("a", "none", "400"): 1,
                       ("unknown", "none", "400"): 1, ("a", "g/0", "200"): 1}


async def _call_and_leave(app, body: dict, leave_after_s: float) -> list[dict]:
    """One request over raw ASGI whose client disconnects ``leave_after_s`` after sending."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path":
             b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent: list[dict] = []
    first = True

    async def receive() -> dict:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 60)
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_aborts_its_engine_request(stream: bool) -> None:
    """400 tokens at real time take seconds on the sim; the client leaves after 0.3 s: the
    engine frees the request (its queue empties, it is recorded as not served) and the ingress
    counts a 499. Had it run to the end, the replica would record it completed."""
    async def run() -> None:
        core, replica = _core(time_scale=1.0)
        await replica.start()
        app = build_api(core)
        await _call_and_leave(app, {"model": "a", "prompt": [5] * 8, "max_tokens": 400,
                                    "stream": stream}, 0.3)
        await asyncio.sleep(0.1)
        assert replica.backend.queue_depth() == (0, 0)
        assert replica.telemetry.in_flight == 0
        snap = replica.telemetry.snapshot()
        assert snap["completed"] == 0 and snap["total_errors"] == 1
        assert core.in_flight[ReplicaId("g", 0)] == 0
        counted = _counted((await _client(core).get("/metrics")).text)
        assert counted == {("a", "g/0" if stream else "none", str(CLIENT_GONE)): 1}
        await replica.stop()

    asyncio.run(run())


def test_the_chat_role_chunk_goes_out_with_the_first_output() -> None:
    """Clients time TTFT from the first chunk: it must not leave before the first token."""
    async def run() -> None:
        token = asyncio.Event()

        async def rest():
            await token.wait()
            yield {"text": "hi", "n": 1, "finish_reason": None}
            yield {"text": " there", "n": 1, "finish_reason": "length"}

        core, _ = _core()
        target = _Target(ReplicaId("g", 0), ReplicaId("g", 0), 0)
        core._acquire(target)
        stream = OpenStream(target, {"replica": "g/0", "prompt_tokens": 3}, rest())
        got: list[tuple[bool, str]] = []

        async def consume() -> None:
            async for event in _sse(core, "a", stream, "chatcmpl-1", True, False, 0.0,
                                    core.arrived("a")):
                got.append((token.is_set(), event))

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        assert got == []  # nothing before the engine's first output
        token.set()
        await task
        first = json.loads(got[0][1][6:])
        assert got[0][0] and first["choices"][0]["delta"] == {"role": "assistant",
                                                              "content": ""}
        texts = [json.loads(e[6:])["choices"][0]["delta"].get("content")
                 for _, e in got[1:-1]]
        assert texts == ["hi", " there"] and got[-1][1] == "data: [DONE]\n\n"

    asyncio.run(run())


def test_the_residency_of_adapters_is_exported() -> None:
    async def run() -> str:
        core, replica = _core()
        await replica.start()
        async with _client(core) as client:
            r = await client.post("/v1/completions", json={"model": "b", "prompt": "x",
                                                           "max_tokens": 2})
            assert r.status_code == 200
            rep = replica.report()
            assert "b" in rep["residency"]["gpu"] and {"a", "b"} <= set(rep["residency"]["cpu"])
            return (await client.get("/metrics")).text

    text = asyncio.run(run())
    assert 'lorafleet_adapter_resident{adapter="b",replica="g/0",tier="gpu"} 1.0' in text
    assert 'lorafleet_adapter_resident{adapter="a",replica="g/0",tier="cpu"} 1.0' in text


def test_a_replica_that_does_not_accept_is_routed_around_and_never_hangs() -> None:
    """A replica on a lost node (before Ray declares it dead), or one Serve cannot restart for
    lack of GPUs, holds what it is sent: after ``accept_timeout_s`` the request goes to the
    other copy, the replica is avoided while that copy serves, and with no copy left the
    answer is an explicit 503 - bounded, never a hang."""
    from orchestrator.serving.backend import EngineUnavailable, GenerateRequest

    plan = synthetic_plan([GroupShape("g", [("a", 8)], copies=2)])
    g = plan.groups[0]
    reg = AdapterRegistry.ranks_only({"a": 8})

    class Silent:
        calls = 0

        async def stream(self, request, whole=False):
            Silent.calls += 1
            await asyncio.sleep(3600)
            yield {}  # pragma: no cover

        async def report(self):
            return {}

    async def run() -> None:
        good = ReplicaCore(ReplicaSpec("g", 1, "sim", g.engine, reg.subset(["a"]), "sim",
                                       sim_time_scale=20.0))
        await good.start()
        core = IngressCore(RoutingTable.from_plan(plan),
                           {ReplicaId("g", 0): Silent(), ReplicaId("g", 1): LocalClient(good)},
                           engine="sim", accept_timeout_s=0.5)
        for i in range(6):
            rid, res = await core.complete("a", GenerateRequest(f"r{i}", "a", 2, prompt="x"))
            assert rid == ReplicaId("g", 1) and res["completion_tokens"] == 2
        assert Silent.calls == 1  # tried once, then avoided
        assert core.in_flight[ReplicaId("g", 0)] == 0  # the held request was withdrawn
        alone = IngressCore(RoutingTable.from_plan(synthetic_plan([GroupShape("g", [("a", 8)])])),
                            {ReplicaId("g", 0): Silent()}, engine="sim", accept_timeout_s=0.5)
        with pytest.raises(EngineUnavailable, match="did not accept the request within 0.5 s"):
            await asyncio.wait_for(alone.complete("a", GenerateRequest("s", "a", 2,
                                                                        prompt="x")), 30)
        with pytest.raises(EngineUnavailable, match="did not accept"):
            await asyncio.wait_for(alone.open_stream("a", GenerateRequest("t", "a", 2,
                                                                           prompt="x")), 30)

    asyncio.run(run())
