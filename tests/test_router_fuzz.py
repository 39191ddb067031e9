"""Schema-driven fuzzing of the ingress (schemathesis-style): bodies generated from the app's
own OpenAPI request schemas, and arbitrary JSON, never produce a 5xx; every error is a JSON
``{"error": ...}`` body carrying the lorafleet headers.

hypothesis-jsonschema 0.23 does not run on this hypothesis (6.170: private API gone), and
schemathesis builds on it, so ``from_schema`` below is a small JSON-schema -> strategy compiler
for the keywords pydantic emits for these models (type, anyOf, $ref, enum/const, bounds,
lengths, properties/required), mixing valid and boundary-breaking values."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.serving.ingress import ENGINE_HEADER, REPLICA_HEADER, IngressCore, build_api
from orchestrator.serving.openai_schema import ChatCompletionRequest, CompletionRequest
from orchestrator.serving.replica import LocalClient, ReplicaCore
from orchestrator.serving.spec import ServingSpec
from placement.synthetic import GroupShape, split_adapters, synthetic_plan

MODELS = ["adapter-0000", "adapter-0001", "adapter-0003", "tiny-llama-cpu", "unknown-x"]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The FastAPI app over in-process sim replicas, on one event loop for all examples."""
    parts = split_adapters(4, 2)
    plan = synthetic_plan([GroupShape("g0", parts[0]), GroupShape("g1", parts[1], copies=2)])
    path = Path(tmp_path_factory.mktemp("fuzz")) / "plan.yaml"
    plan.to_yaml(path)
    spec = ServingSpec.from_args({"plan_path": str(path), "engine": "sim",
                                  "sim_time_scale": 1000.0})
    loop = asyncio.new_event_loop()
    cores = {r.replica_id: ReplicaCore(r) for r in spec.replica_specs()}
    for c in cores.values():
        loop.run_until_complete(c.start())
    core = IngressCore(spec.routing_table(), {k: LocalClient(v) for k, v in cores.items()},
                       engine="sim", timeout_s=30)
    app = build_api(core)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f")
    yield app, client, loop
    loop.run_until_complete(client.aclose())
    for c in cores.values():
        loop.run_until_complete(c.stop())
    loop.close()


def _check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, resp.text
    assert resp.headers[ENGINE_HEADER] == "sim" and REPLICA_HEADER in resp.headers
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert err["code"] == resp.status_code and err["message"]


def from_schema(schema: dict, defs: dict | None = None) -> st.SearchStrategy:
    """Values valid for ``schema`` (JSON-schema subset pydantic emits); see module docstring."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(defs[schema["$ref"].split("/")[-1]], defs))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    t = schema.get("type")
    if t == "string":
        return st.text(min_size=schema.get("minLength", 0),
                       max_size=min(schema.get("maxLength", 40), 40))
    if t == "integer":
        if "minimum" in schema:
            lo = schema["minimum"]
        elif "exclusiveMinimum" in schema:
            lo = schema["exclusiveMinimum"] + 1
        else:
            lo = -(2**40)
        hi = schema.get("maximum", 2**40)
        return st.one_of(st.integers(lo, min(hi, lo + 600)), st.integers(lo, hi))
    if t == "number":
        return st.floats(schema.get("minimum", schema.get("exclusiveMinimum")),
                         schema.get("maximum"), allow_nan=False, allow_infinity=False,
                         exclude_min="exclusiveMinimum" in schema)
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "array":
        return st.lists(from_schema(schema.get("items", {}), defs),
                        min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 6), 6))
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, defs) for k, v in props.items() if k in required},
            optional={k: from_schema(v, defs) for k, v in props.items() if k not in required})
    return st.none() | st.integers() | st.text(max_size=5)


def _schema(model: type) -> dict:
    return model.model_json_schema(ref_template="#/$defs/{model}")


def _bodies(model: type) -> st.SearchStrategy:
    def with_model(body: dict, m: str, keep: bool) -> dict:
        return body if keep else {**body, "model": m}

    return st.builds(with_model, from_schema(_schema(model)), st.sampled_from(MODELS),
                     st.booleans())


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def test_openapi_schema_is_served(api) -> None:
    app, client, loop = api
    schema = loop.run_until_complete(client.get("/openapi.json")).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
            "/metrics"} <= set(schema["paths"])


@SETTINGS
@given(body=_bodies(CompletionRequest))
def test_completions_schema_bodies_never_5xx(api, body) -> None:
    _, client, loop = api
    _check(loop.run_until_complete(client.post("/v1/completions", json=body)))


@SETTINGS
@given(body=_bodies(ChatCompletionRequest))
def test_chat_schema_bodies_never_5xx(api, body) -> None:
    _, client, loop = api
    _check(loop.run_until_complete(client.post("/v1/chat/completions", json=body)))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=4),
                    max_leaves=12)


@SETTINGS
@given(body=JSON, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_arbitrary_json_never_5xx(api, body, path) -> None:
    _, client, loop = api
    resp = loop.run_until_complete(client.post(path, content=json.dumps(body),
                                               headers={"content-type": "application/json"}))
    _check(resp)
