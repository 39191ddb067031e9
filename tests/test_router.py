"""The serving path without Ray: routing table, adapter registry, API keys, the sim engine, and
the OpenAI-compatible ingress over in-process sim replicas (httpx ASGI transport)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import make_profile

from orchestrator.serving.api_keys import ApiKeys
from orchestrator.serving.backend import GenerateRequest, UnknownModel
from orchestrator.serving.ingress import ENGINE_HEADER, REPLICA_HEADER, IngressCore, build_api
from orchestrator.serving.listener import Listener, ListenError, bind, parse_listen
from orchestrator.serving.registry import AdapterRegistry, RegistryError
from orchestrator.serving.replica import LocalClient, ReplicaCore
from orchestrator.serving.routing import ReplicaId, RoutingTable
from orchestrator.serving.sim_engine import SimEngine
from orchestrator.serving.spec import ServingSpec, SpecError
from orchestrator.serving.telemetry import RequestRecord, Telemetry
from placement.synthetic import GroupShape, split_adapters, synthetic_plan
from twin.config import EngineConfig

# ----------------------------------------------------------------------------- routing table


def test_routing_follows_weights_then_least_loaded() -> None:
    table = RoutingTable({"hot": [("g-hot", 0.75), ("g-shared", 0.25)], "cold": [("g-shared", 1)]},
                         {"g-hot": 2, "g-shared": 1}, rng=random.Random(1))
    load: Counter[ReplicaId] = Counter()
    picks = Counter()
    for _ in range(4000):
        r = table.route("hot", load.__getitem__)
        picks[r.group] += 1
        if r.group == "g-hot":
            load[r] += 1  # requests stay in flight: least-loaded alternates the copies
    assert abs(picks["g-hot"] / 4000 - 0.75) < 0.03
    assert abs(load[ReplicaId("g-hot", 0)] - load[ReplicaId("g-hot", 1)]) <= 1
    assert {table.route("cold", load.__getitem__) for _ in range(20)} == {ReplicaId("g-shared", 0)}


def test_routing_unknown_adapter_names_it_and_base_model_goes_anywhere() -> None:
    table = RoutingTable({"a": [("g0", 1.0)]}, {"g0": 1, "g1": 2}, base_model="base")
    with pytest.raises(UnknownModel, match="'nope'"):
        table.route("nope", lambda r: 0)
    load = {ReplicaId("g0", 0): 3, ReplicaId("g1", 0): 1, ReplicaId("g1", 1): 0}
    assert table.route("base", load.__getitem__) == ReplicaId("g1", 1)
    with pytest.raises(ValueError, match="unknown group"):
        RoutingTable({"a": [("gx", 1.0)]}, {"g0": 1})


def test_a_retry_follows_the_same_weights_without_the_failed_replica() -> None:
    """``hot`` goes 3:1 to g-hot (2 copies) and g-shared (1 copy). After g-hot/0 failed, the
    retry keeps the plan's weights (g-hot/1 still serves g-hot's share: 3:1), where a
    least-loaded pick over the survivors would ignore them; after both g-hot copies failed
    all of it goes to g-shared; with every copy tried there is none left."""
    table = RoutingTable({"hot": [("g-hot", 0.75), ("g-shared", 0.25)]},
                         {"g-hot": 2, "g-shared": 1}, rng=random.Random(2))
    h0, h1, sh = ReplicaId("g-hot", 0), ReplicaId("g-hot", 1), ReplicaId("g-shared", 0)
    busy = {h0: 0, h1: 5, sh: 0}  # g-hot/1 is the busiest survivor
    picks = Counter(table.route("hot", busy.__getitem__, exclude={h0}) for _ in range(4000))
    assert set(picks) == {h1, sh}
    assert abs(picks[h1] / 4000 - 0.75) < 0.03  # binomial sd 0.007
    assert {table.route("hot", busy.__getitem__, exclude={h0, h1}) for _ in range(50)} == {sh}
    assert table.route("hot", busy.__getitem__, exclude={h0, h1, sh}) is None
    # the base model: any replica not tried, least-loaded first
    base = RoutingTable({"hot": [("g-hot", 1.0)]}, {"g-hot": 2, "g-shared": 1})
    assert base.route("base", busy.__getitem__, exclude={h0, sh}) == h1
    assert base.route("base", busy.__getitem__, exclude={h0, h1, sh}) is None


def test_a_request_is_tried_on_two_replicas_at_most() -> None:
    table = RoutingTable({"a": [("g0", 1.0)]}, {"g0": 3})
    assert [table.may_retry(n) for n in (1, 2, 3)] == [True, False, False]


def test_routing_table_from_plan_splits_hot_adapter() -> None:
    plan = synthetic_plan([
        GroupShape("hot", [("a0", 8)], copies=2, rate_rps=3.0),
        GroupShape("shared", [("a0", 8), ("a1", 16)], rate_rps=2.0),
    ])
    table = RoutingTable.from_plan(plan)
    assert dict(table.routes["a0"]) == pytest.approx({"hot": 0.75, "shared": 0.25})
    assert table.copies == {"hot": 2, "shared": 1}
    assert len(table.replicas) == 3


# ----------------------------------------------------------------------------- registry / keys


def _adapter_dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_registry_refuses_paths_outside_roots(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    _adapter_dir(root, "a")
    outside = _adapter_dir(tmp_path / "elsewhere", "b")
    reg = AdapterRegistry.build([{"id": "a", "rank": 8, "path": str(root / "a")},
                                 {"id": "r", "rank": 16, "uri": "s3://bucket/r"}], roots=[root])
    assert reg.get("a").path == str((root / "a").resolve()) and reg.get("r").uri
    for bad in (str(outside), str(root / ".." / "elsewhere" / "b")):
        with pytest.raises(RegistryError, match="outside the allowed adapter roots"):
            AdapterRegistry.build([{"id": "b", "rank": 8, "path": bad}], roots=[root])
    (root / "link").symlink_to(outside)
    with pytest.raises(RegistryError, match="outside"):
        AdapterRegistry.build([{"id": "l", "rank": 8, "path": str(root / "link")}], roots=[root])
    with pytest.raises(RegistryError, match="not a supported remote URI"):
        AdapterRegistry.build([{"id": "f", "rank": 8, "uri": "file:///etc"}], roots=[root])
    with pytest.raises(RegistryError, match="not in the adapter registry"):
        reg.get("zzz")


def test_api_keys_tenants() -> None:
    keys = ApiKeys.from_dict({"keys": [
        {"key": "sk-a", "tenant": "acme", "adapters": ["acme-*"], "base_model": True},
        {"key": "sk-b", "tenant": "globex", "adapters": ["globex-1"]},
    ]})
    acme = keys.tenant("Bearer sk-a")
    assert acme is not None and acme.name == "acme"
    keys.check(acme, "acme-7", is_base=False)
    keys.check(acme, "base", is_base=True)
    with pytest.raises(Exception, match="may not use model 'globex-1'") as e:
        keys.check(acme, "globex-1", is_base=False)
    assert e.value.status == 403
    for header in (None, "Bearer nope", "sk-a"):
        with pytest.raises(Exception) as e:
            keys.tenant(header)
        assert e.value.status == 401
    assert "sk-a" not in json.dumps(keys.to_dict())  # only hashes travel
    assert ApiKeys.from_dict(keys.to_dict()).tenant("Bearer sk-b").name == "globex"


# ----------------------------------------------------------------------------- telemetry / sim


def test_telemetry_window_figures() -> None:
    now = [100.0]
    t = Telemetry(clock=lambda: now[0], window_s=10)
    for _ in range(4):
        a = t.arrived("x")
        t.finished(RequestRecord("x", a, a + 0.1, a + 1.1, 10, 11, True))
        now[0] += 1
    snap = t.snapshot()
    assert snap["completed"] == 4 and snap["in_flight"] == 0
    assert snap["ttft_p50_ms"] == pytest.approx(100)
    assert snap["itl_mean_ms"] == pytest.approx(100)  # 1 s over 10 decode tokens
    assert snap["adapters"]["x"]["rate_rps"] == pytest.approx(1.0)


def test_sim_engine_steps_take_the_profiles_time_and_respect_max_loras() -> None:
    """Two requests of 10 output tokens (8-token prompts, one step of prefill that yields the
    first token) on two adapters with max_loras=1: b cannot join a's batch, so it runs after
    it, 10 + 10 = 20 steps of the profile's 5 ms (together they would take 10)."""
    prof = make_profile(const_ms=5.0)  # every step 5 ms

    async def run() -> tuple[SimEngine, list[int], list[str]]:
        eng = SimEngine(EngineConfig(max_loras=1, max_lora_rank=8, max_num_seqs=8,
                                     max_num_batched_tokens=64), prof, {"a": 8, "b": 8},
                        time_scale=10.0)
        await eng.start()
        done: list[str] = []

        async def one(adapter: str) -> int:
            n = 0
            async for d in eng.generate(GenerateRequest(adapter, adapter, 10,
                                                        prompt_token_ids=(1,) * 8)):
                n += d.n_tokens
            done.append(adapter)
            return n

        counts = await asyncio.gather(one("a"), one("b"))
        await eng.stop()
        return eng, list(counts), done

    eng, counts, done = asyncio.run(run())
    assert counts == [10, 10] and done == ["a", "b"]
    assert eng.steps == 20
    assert eng.busy_ms == pytest.approx(20 * 5.0)


# ----------------------------------------------------------------------------- ingress (in-process)


@pytest.fixture
def sim_stack(tmp_path: Path):
    """Ingress over in-process sim replicas: groups g0 (1 copy), g1 (2 copies), a hot adapter."""
    parts = split_adapters(8, 2)
    plan = synthetic_plan([GroupShape("g0", parts[0]),
                           GroupShape("g1", [*parts[1], parts[0][0]], copies=2)])
    path = tmp_path / "plan.yaml"
    plan.to_yaml(path)
    keys = {"keys": [{"key": "sk-t1", "tenant": "t1", "adapters": ["adapter-0000"]}]}

    def make(api_keys: dict | None = None) -> tuple[httpx.AsyncClient, dict]:
        spec = ServingSpec.from_args({"plan_path": str(path), "engine": "sim",
                                      "sim_time_scale": 20.0})
        cores = {r.replica_id: ReplicaCore(r) for r in spec.replica_specs()}
        core = IngressCore(spec.routing_table(), {k: LocalClient(v) for k, v in cores.items()},
                           engine="sim", api_keys=ApiKeys.from_dict(api_keys))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(core)),
                                   base_url="http://lorafleet")
        return client, cores

    async def start(cores: dict) -> None:
        for c in cores.values():
            await c.start()

    return plan, make, start, keys


def test_api_routes_every_adapter_to_its_planned_group(sim_stack) -> None:
    plan, make, start, _ = sim_stack

    async def run() -> None:
        client, cores = make()
        await start(cores)
        async with client:
            for adapter, routes in plan.routing.items():
                groups = {r.group for r in routes}
                for _ in range(4):
                    r = await client.post("/v1/completions", json={
                        "model": adapter, "prompt": "hello", "max_tokens": 3})
                    assert r.status_code == 200, r.text
                    assert r.headers[ENGINE_HEADER] == "sim"
                    assert r.headers[REPLICA_HEADER].split("/")[0] in groups
                    assert r.json()["usage"]["completion_tokens"] == 3
            models = (await client.get("/v1/models")).json()["data"]
            assert {m["id"] for m in models} == {*plan.routing, plan.profile.model}
            health = await client.get("/health")
            assert health.status_code == 200 and health.headers[REPLICA_HEADER] == "none"
            metrics = (await client.get("/metrics")).text
            assert 'lorafleet_requests_total{model="adapter-0001",replica="g1/' in metrics
        used = {rid for rid, c in cores.items() if c.telemetry.total_requests}
        assert used == set(cores)  # both copies of g1 served

    asyncio.run(run())


def test_api_streaming_chat_and_errors(sim_stack) -> None:
    _, make, start, _ = sim_stack

    async def run() -> None:
        client, cores = make()
        await start(cores)
        async with client:
            r = await client.post("/v1/chat/completions", json={
                "model": "adapter-0001", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})
            assert r.status_code == 200 and r.headers[REPLICA_HEADER].startswith("g1/")
            events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                           if c["choices"])
            assert len(text.split()) == 4 and chunks[-1]["usage"]["completion_tokens"] == 4
            r = await client.post("/v1/completions", json={"model": "ghost", "prompt": "x"})
            assert r.status_code == 404 and "'ghost'" in r.json()["error"]["message"]
            for bad in (b"{not json", b'{"prompt": "x"}', b'{"model": "adapter-0000"}',
                        b'{"model": "adapter-0000", "prompt": "x", "max_tokens": -1}'):
                r = await client.post("/v1/completions", content=bad,
                                      headers={"content-type": "application/json"})
                assert r.status_code == 400, (bad, r.text)
                assert r.json()["error"]["type"] == "invalid_request_error"
            r = await client.post("/v1/completions", json={
                "model": "adapter-0000", "prompt": "word " * 1000, "max_tokens": 8})
            assert r.status_code == 400 and "512" in r.json()["error"]["message"]
            r = await client.post("/v1/completions", json={
                "model": "adapter-0000", "prompt": [5] * 100, "max_tokens": 500, "stream": True})
            assert r.status_code == 400 and "maximum context length is 512" in r.text

    asyncio.run(run())


def test_api_keys_enforced(sim_stack) -> None:
    _, make, start, keys = sim_stack

    async def run() -> None:
        client, cores = make(keys)
        await start(cores)
        body = {"model": "adapter-0000", "prompt": "x", "max_tokens": 2}
        async with client:
            assert (await client.post("/v1/completions", json=body)).status_code == 401
            bad = {"authorization": "Bearer wrong"}
            assert (await client.post("/v1/completions", json=body, headers=bad)).status_code \
                == 401
            ok = {"authorization": "Bearer sk-t1"}
            assert (await client.post("/v1/completions", json=body, headers=ok)).status_code \
                == 200
            r = await client.post("/v1/completions", json={**body, "model": "adapter-0001"},
                                  headers=ok)
            assert r.status_code == 403 and "adapter-0001" in r.json()["error"]["message"]
            models = (await client.get("/v1/models", headers=ok)).json()["data"]
            assert [m["id"] for m in models] == ["adapter-0000"]

    asyncio.run(run())


def test_dead_replica_fails_explicitly(sim_stack) -> None:
    _, make, start, _ = sim_stack

    class Dead:
        def stream(self, request, whole=False):
            raise ConnectionError("actor died")

        async def report(self):
            raise ConnectionError("actor died")

    async def run() -> None:
        client, cores = make()
        await start(cores)
        async with client:
            # g0 has one copy: kill it -> 503 naming the replica, not a hang
            for c in cores.values():
                if c.spec.group == "g0":
                    await c.stop()
            r = await asyncio.wait_for(client.post("/v1/completions", json={
                "model": "adapter-0002", "prompt": "x", "max_tokens": 2}), 10)
            assert r.status_code == 503 and r.headers[REPLICA_HEADER] == "g0/0", r.text

    asyncio.run(run())
    # the ingress retries another copy once when a replica is unreachable
    plan = synthetic_plan([GroupShape("g", [("a", 8)], copies=2)])
    table = RoutingTable.from_plan(plan)

    async def retry() -> None:
        good = ReplicaCore(_spec_for(plan, 1))
        await good.start()
        core = IngressCore(table, {ReplicaId("g", 0): Dead(), ReplicaId("g", 1): LocalClient(good)},
                           engine="sim")
        rid, res = await core.complete("a", GenerateRequest("r", "a", 2, prompt="x"))
        assert rid == ReplicaId("g", 1) and res["completion_tokens"] == 2

    asyncio.run(retry())


def test_a_replica_lacking_a_routed_adapter_is_retried_then_503_never_404() -> None:
    """A replica re-targeted away from an adapter (or restarted by Serve with its first
    adapters) refuses it; the ingress tries the other copy, and with none left answers 503."""
    from orchestrator.serving.backend import EngineUnavailable
    from orchestrator.serving.registry import AdapterEntry

    plan = synthetic_plan([GroupShape("g", [("a", 8)], copies=2)])

    async def run() -> None:
        stale, good = ReplicaCore(_spec_for(plan, 0)), ReplicaCore(_spec_for(plan, 1))
        for c in (stale, good):
            await c.start()
        await stale.assign("g", 0, [AdapterEntry("other", 8, uri="sim://other")])
        both = IngressCore(RoutingTable.from_plan(plan),
                           {ReplicaId("g", 0): LocalClient(stale),
                            ReplicaId("g", 1): LocalClient(good)}, engine="sim")
        for i in range(4):  # whichever copy is picked first, the answer comes from g/1
            rid, res = await both.complete("a", GenerateRequest(f"r{i}", "a", 2, prompt="x"))
            assert rid == ReplicaId("g", 1) and res["completion_tokens"] == 2
        one = synthetic_plan([GroupShape("g", [("a", 8)])])
        alone = IngressCore(RoutingTable.from_plan(one), {ReplicaId("g", 0): LocalClient(stale)},
                            engine="sim")
        with pytest.raises(EngineUnavailable):
            await alone.complete("a", GenerateRequest("s", "a", 2, prompt="x"))
        with pytest.raises(UnknownModel, match="nope"):  # a truly unknown model stays a 404
            alone.authorize(None, "nope")

    asyncio.run(run())


def _spec_for(plan, copy: int):
    from orchestrator.serving.spec import ReplicaSpec

    g = plan.groups[0]
    reg = AdapterRegistry.ranks_only({a.id: a.rank for a in g.adapters})
    return ReplicaSpec(g.name, copy, "sim", g.engine, reg.subset(g.adapter_ids), "sim",
                       sim_time_scale=20.0)


def test_serving_spec_errors(tmp_path: Path) -> None:
    plan = synthetic_plan([GroupShape("g", [("a", 8)])])
    path = tmp_path / "p.yaml"
    plan.to_yaml(path)
    with pytest.raises(SpecError, match="needs --model"):
        ServingSpec.from_args({"plan_path": str(path), "engine": "vllm"})
    with pytest.raises(SpecError, match="engine"):
        ServingSpec.from_args({"plan_path": str(path), "engine": "tpu"})
    with pytest.raises(SpecError, match="unknown argument"):
        ServingSpec.from_args({"plan_path": str(path), "colour": 1})
    for bad in ("127.0.0.1:0", "host:http", "70000", ""):
        with pytest.raises(SpecError, match="listen: expected HOST:PORT"):
            ServingSpec.from_args({"plan_path": str(path), "engine": "sim", "listen": bad})
    spec = ServingSpec.from_args({"plan_path": str(path), "engine": "sim", "listen": 8123})
    assert spec.listen == ("127.0.0.1", 8123)
    assert parse_listen("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_listen("[::1]:9000") == ("::1", 9000)


def test_deploy_records_the_head_host_of_a_cluster_address() -> None:
    from orchestrator.control.deploy import head_host

    assert head_host("10.0.0.5:6379") == "10.0.0.5"
    assert head_host("ray://head.example:10001") == "head.example"
    assert head_host("ray://[fd00::1]:10001") == "fd00::1"
    assert head_host("auto") == "127.0.0.1"


def test_listener_serves_the_api_on_a_shared_port_and_stops(tmp_path: Path) -> None:
    """Two ingress listeners share one port (SO_REUSEPORT); a port another program holds is an
    error naming it; a stopped listener frees the port."""
    import socket

    from orchestrator.control.cluster import free_port

    plan = synthetic_plan([GroupShape("g", [("a", 8), ("b", 16)])])
    plan.to_yaml(tmp_path / "p.yaml")
    spec = ServingSpec.from_args({"plan_path": str(tmp_path / "p.yaml"), "engine": "sim",
                                  "sim_time_scale": 20.0})
    port = free_port()

    async def run() -> None:
        cores = {r.replica_id: ReplicaCore(r) for r in spec.replica_specs()}
        for c in cores.values():
            await c.start()
        core = IngressCore(spec.routing_table(), {k: LocalClient(v) for k, v in cores.items()},
                           engine="sim")
        one = Listener.start(build_api(core), "127.0.0.1", port)
        two = Listener.start(build_api(core), "127.0.0.1", port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for _ in range(20):  # a server is up once it answers
                try:
                    await c.get("/health")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
            for model in ("a", "b", "a"):
                r = await c.post("/v1/completions",
                                 json={"model": model, "prompt": [1, 2, 3], "max_tokens": 2})
                assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "g/0"
            r = await c.post("/v1/completions", json={"model": "zz", "prompt": "x"})
            assert r.status_code == 404 and "zz" in r.text
        await one.stop()
        await two.stop()
        for c in cores.values():
            await c.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)

    asyncio.run(run())
    held = socket.socket()
    held.bind(("127.0.0.1", port))
    held.listen()
    try:
        with pytest.raises(ListenError, match=f"cannot bind 127.0.0.1:{port}"):
            bind("127.0.0.1", port)
    finally:
        held.close()


def test_kuberay_builder_builds_the_application(tmp_path: Path) -> None:
    """`orchestrator.serving.app:build_app` with the manifest's one argument (plus the engine)."""
    from ray.serve._private.utils import import_attr

    plan = synthetic_plan([GroupShape("g", [("a", 8)], copies=2)])
    plan.to_yaml(tmp_path / "plan.yaml")
    build_app = import_attr("orchestrator.serving.app:build_app")
    app = build_app({"plan_path": str(tmp_path / "plan.yaml"), "engine": "sim"})
    assert type(app).__name__ == "Application"
    with pytest.raises(SpecError, match="needs --model"):
        build_app({"plan_path": str(tmp_path / "plan.yaml")})  # vllm by default


def test_the_ingress_counts_each_client_request_once() -> None:
    """The offered load the controller estimates from: every client request once, at arrival
    (a request retried on another copy after its replica died is still one); refusals before
    routing (unknown model, malformed) are no load on any adapter."""
    from orchestrator.control.window import TelemetryBatch

    class Dead:
        async def stream(self, request, whole=False):
            raise ConnectionError("actor died")
            yield {}  # pragma: no cover - makes this an async generator

        async def report(self):
            raise ConnectionError("actor died")

    plan = synthetic_plan([GroupShape("g", [("a", 8)], copies=2)])

    async def run() -> None:
        good = ReplicaCore(_spec_for(plan, 1))
        await good.start()
        core = IngressCore(RoutingTable.from_plan(plan),
                           {ReplicaId("g", 0): Dead(), ReplicaId("g", 1): LocalClient(good)},
                           engine="sim")
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(core)),
                                   base_url="http://lorafleet")
        async with client:
            for i in range(6):
                r = await client.post("/v1/completions", json={
                    "model": "a", "prompt": "x", "max_tokens": 3, "stream": i % 2 == 1})
                assert r.status_code == 200, r.text
            assert (await client.post("/v1/completions", json={
                "model": "ghost", "prompt": "x"})).status_code == 404
            assert (await client.post("/v1/completions", json={"prompt": "x"})).status_code \
                == 400
        batch = TelemetryBatch.from_dict(core.take_offered("ing-1"))
        assert core.retried >= 1  # the dead copy was tried, and the request sent again
        assert dict(batch.arrivals) == {"a": 6} and dict(batch.finished) == {"a": 6}
        assert dict(batch.output_tokens) == {"a": 18}
        assert good.telemetry.total_requests == 6  # the engine saw each once too, here
        assert dict(TelemetryBatch.from_dict(core.take_offered("ing-1")).arrivals) == {}

    asyncio.run(run())
