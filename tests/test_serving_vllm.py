"""The serving path with real vLLM replicas (CPU build, tiny generated model) on Ray Serve.

One deployment for the module: two replica groups, four adapters (ranks 8 and 16) from
`lorafleet tiny-model`, API keys on. Checks what a user relies on: each adapter's requests land
on the replica the plan names (header), streaming yields several chunks and [DONE], the official
`openai` client works unchanged, 404/400 paths, keys enforced per tenant. One adapter's source
is remote: an HTTP URI on a local server (with its files' sha256), which the replica fetches
into its cache before vLLM loads it.
"""

from __future__ import annotations

import json

import httpx
import pytest

from orchestrator.serving.ingress import ENGINE_HEADER, REPLICA_HEADER
from placement.synthetic import GroupShape, synthetic_plan

pytestmark = pytest.mark.integration
ALL = {"authorization": "Bearer sk-all"}
T1 = {"authorization": "Bearer sk-t1"}
GROUPS = {"group-a": [("adapter-0000", 8), ("adapter-0001", 16)],
          "group-b": [("adapter-0002", 8), ("adapter-0003", 16)]}


@pytest.fixture(scope="module")
def vllm_app(ray_cluster, tmp_path_factory):
    import http.server
    import os
    import threading
    from functools import partial

    import yaml
    from ray import serve

    from orchestrator.control.cluster import free_port
    from orchestrator.measure.tiny_model import build_tiny_model
    from orchestrator.serving.adapter_fetch import CACHE_ENV, digests
    from orchestrator.serving.app import run_application
    from orchestrator.serving.spec import ServingSpec

    root = tmp_path_factory.mktemp("vllm")
    build_tiny_model(root / "tiny", n_adapters=4, ranks=(8, 16))
    # adapter-0003 from http://: a local server over the tiny model's adapter folders
    www = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(
        http.server.SimpleHTTPRequestHandler, directory=str(root / "tiny" / "adapters")))
    threading.Thread(target=www.serve_forever, daemon=True).start()
    registry = yaml.safe_load((root / "tiny" / "adapters.yaml").read_text())
    for a in registry["adapters"]:
        if a["id"] == "adapter-0003":
            a["uri"] = f"http://127.0.0.1:{www.server_address[1]}/adapter-0003"
            a["sha256"] = dict(digests(root / "tiny" / a.pop("path")))
    (root / "tiny" / "remote.yaml").write_text(yaml.safe_dump(registry))
    os.environ[CACHE_ENV] = str(root / "adapter-cache")  # the replicas get the deployer's
    plan = synthetic_plan([GroupShape(g, a) for g, a in GROUPS.items()])
    plan.to_yaml(root / "plan.yaml")
    keys = {"keys": [
        {"key": "sk-all", "tenant": "ops", "adapters": ["*"], "base_model": True},
        {"key": "sk-t1", "tenant": "t1", "adapters": ["adapter-0000"]},
    ]}
    listen = f"127.0.0.1:{free_port()}"
    spec = ServingSpec.from_args({"plan_path": str(root / "plan.yaml"), "engine": "vllm",
                                  "adapter_registry": str(root / "tiny" / "remote.yaml"),
                                  "api_keys": keys, "listen": listen})
    run_application(spec)
    yield plan, f"http://{listen}"  # the ingress's own listener; ray_cluster.url: Serve's proxy
    serve.delete("lorafleet")
    www.shutdown()
    os.environ.pop(CACHE_ENV, None)
    fetched = list((root / "adapter-cache").iterdir())
    assert [p.name.split("-")[:2] for p in fetched] == [["adapter", "0003"]], fetched


@pytest.mark.parametrize("via", ["listener", "serve_proxy"])
def test_vllm_requests_land_on_the_planned_replica(vllm_app, ray_cluster, via: str) -> None:
    plan, url = vllm_app
    url = url if via == "listener" else ray_cluster.url
    for group, adapters in GROUPS.items():
        for adapter, _ in adapters:
            for _ in range(2):
                r = httpx.post(f"{url}/v1/completions", headers=ALL, timeout=120, json={
                    "model": adapter, "prompt": "hello fleet", "max_tokens": 4,
                    "ignore_eos": True})
                assert r.status_code == 200, r.text
                assert r.headers[REPLICA_HEADER] == f"{group}/0"
                assert r.headers[ENGINE_HEADER] == "vllm"
                assert r.json()["usage"]["completion_tokens"] == 4
    base = httpx.post(f"{url}/v1/completions", headers=ALL, timeout=120, json={
        "model": plan.profile.model, "prompt": "hello", "max_tokens": 2})
    assert base.status_code == 200 and base.headers[REPLICA_HEADER].split("/")[0] in GROUPS


@pytest.mark.parametrize("via", ["listener", "serve_proxy"])
def test_vllm_streaming_yields_chunks_and_done(vllm_app, ray_cluster, via: str) -> None:
    _, url = vllm_app
    url = url if via == "listener" else ray_cluster.url
    with httpx.stream("POST", f"{url}/v1/completions", headers=ALL, timeout=120, json={
            "model": "adapter-0003", "prompt": "stream me", "max_tokens": 6, "stream": True,
            "ignore_eos": True}) as r:
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "group-b/0"
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_vllm_openai_client_unchanged(vllm_app) -> None:
    import openai

    _, url = vllm_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-all", max_retries=0, timeout=120)
    out = client.completions.create(model="adapter-0001", prompt="hi", max_tokens=5,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5 and out.choices[0].text
    chat = client.chat.completions.create(
        model="adapter-0002", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    stream = client.chat.completions.create(
        model="adapter-0000", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        stream=True, extra_body={"ignore_eos": True})
    assert sum(1 for c in stream if c.choices and c.choices[0].delta.content) >= 2
    ids = {m.id for m in client.models.list()}
    assert {"adapter-0000", "adapter-0003"} <= ids
    with pytest.raises(openai.NotFoundError, match="adapter-9999"):
        client.completions.create(model="adapter-9999", prompt="x")


def test_vllm_error_paths_and_keys(vllm_app) -> None:
    _, url = vllm_app
    post = lambda body, headers=ALL: httpx.post(  # noqa: E731
        f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    r = post({"model": "adapter-0042", "prompt": "x"})
    assert r.status_code == 404 and "adapter-0042" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b"{oops", timeout=30,
                   headers={**ALL, "content-type": "application/json"})
    assert r.status_code == 400
    assert post({"model": "adapter-0000"}).status_code == 400  # no prompt
    r = post({"model": "adapter-0000", "prompt": "word " * 600, "max_tokens": 4})
    assert r.status_code == 400 and "512" in r.json()["error"]["message"]
    assert r.headers[REPLICA_HEADER] == "group-a/0"
    # keys: none -> 401, tenant t1 reaches adapter-0000 only
    assert post({"model": "adapter-0000", "prompt": "x", "max_tokens": 1}, {}).status_code == 401
    assert post({"model": "adapter-0000", "prompt": "x", "max_tokens": 1}, T1).status_code == 200
    r = post({"model": "adapter-0002", "prompt": "x", "max_tokens": 1}, T1)
    assert r.status_code == 403 and "adapter-0002" in r.json()["error"]["message"]
