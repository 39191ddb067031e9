"""The serving path on Ray Serve with ``sim`` replicas: 240 adapters over four groups (one
replicated, one hot adapter split over two groups), every request lands where the plan says;
telemetry reaches ``status``; and the CLI's deploy/status/shutdown leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from orchestrator.serving.ingress import ENGINE_HEADER, REPLICA_HEADER
from placement.synthetic import GroupShape, split_adapters, synthetic_plan

pytestmark = pytest.mark.integration
N_ADAPTERS = 240


@pytest.fixture(scope="module")
def sim_app(ray_cluster, tmp_path_factory):
    from ray import serve

    from orchestrator.control.cluster import free_port
    from orchestrator.serving.app import run_application
    from orchestrator.serving.spec import ServingSpec

    parts = split_adapters(N_ADAPTERS, 3)
    hot = parts[0][0]
    plan = synthetic_plan([
        GroupShape("hot", [hot], copies=2, rate_rps=2.0),
        *(GroupShape(f"group-{i}", p, max_loras=16) for i, p in enumerate(parts)),
    ])
    path = tmp_path_factory.mktemp("sim") / "plan.yaml"
    plan.to_yaml(path)
    listen = f"127.0.0.1:{free_port()}"
    spec = ServingSpec.from_args({"plan_path": str(path), "engine": "sim", "listen": listen})
    run_application(spec)
    yield plan, path, f"http://{listen}"  # the ingress's own listener; ray_cluster.url: Serve's
    serve.delete("lorafleet")


@pytest.mark.parametrize("via", ["listener", "serve_proxy"])
def test_sim_every_adapter_lands_on_its_planned_group(sim_app, ray_cluster, via: str) -> None:
    plan, _, url = sim_app
    url = url if via == "listener" else ray_cluster.url
    assert len(plan.routing) == N_ADAPTERS

    async def run() -> list[tuple[str, int, str, str]]:
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(adapter: str) -> tuple[str, int, str, str]:
                async with sem:
                    r = await client.post("/v1/completions", json={
                        "model": adapter, "prompt": [11, 12, 13, 14], "max_tokens": 2})
                    return (adapter, r.status_code, r.headers.get(REPLICA_HEADER, ""),
                            r.headers.get(ENGINE_HEADER, ""))

            hot = plan.groups[0].adapters[0].id
            return await asyncio.gather(*[one(a) for a in plan.routing], *[one(hot)] * 40)

    results = asyncio.run(run())
    replicas_used = set()
    for adapter, status, replica, engine in results:
        assert status == 200 and engine == "sim"
        group = replica.split("/")[0]
        assert group in {r.group for r in plan.routing[adapter]}, (adapter, replica)
        replicas_used.add(replica)
    assert {"hot/0", "hot/1", "group-0/0", "group-1/0", "group-2/0"} <= replicas_used


def test_sim_openai_client_and_status_reports(sim_app, ray_cluster) -> None:
    import openai

    from orchestrator.control.deploy import DeployState, collect_reports

    plan, path, url = sim_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    adapter = plan.group("group-1").adapters[3].id
    out = client.completions.create(model=adapter, prompt="hello", max_tokens=5)
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
    assert len([c for c in chat if c.choices and c.choices[0].delta.content]) == 3
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x")

    state = DeployState(address=ray_cluster.address, url=url, engine="sim",
                        plan_path=str(path), app_name="lorafleet",
                        replicas=["hot/0", "group-1/0"],
                        deployments={"hot/0": "engine-hot-0", "group-1/0": "engine-group-1-0"})
    reports = collect_reports(state, window_s=300)
    g1 = reports["group-1/0"]
    assert g1["engine"] == "sim" and len(g1["adapters"]) == N_ADAPTERS // 3
    assert adapter in g1["adapters_live"] and g1["total_requests"] >= 2
    assert reports["hot/0"]["adapters"] == [plan.groups[0].adapters[0].id]


def test_deploy_status_shutdown_cli_leaves_no_process(tmp_path: Path) -> None:
    """`lorafleet deploy --engine sim` starts its own head; shutdown stops exactly that tree."""
    import psutil

    from orchestrator.control.cluster import free_port

    plan = synthetic_plan([GroupShape("a", [("x-1", 8), ("x-2", 16)]),
                           GroupShape("b", [("y-1", 8)], copies=2)])
    plan.to_yaml(tmp_path / "plan.yaml")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cli = [sys.executable, "-m", "orchestrator.cli"]
    state = ["--state-dir", str(tmp_path / "state")]

    def run(*args: str) -> dict:
        res = subprocess.run([*cli, *args, *state, "--json"], capture_output=True, text=True,
                             env=env, timeout=300, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    deployed = run("deploy", str(tmp_path / "plan.yaml"), "--engine", "sim", "--port", str(port),
                   "--num-cpus", "2")
    head_pid = json.loads((tmp_path / "state" / "deploy.json").read_text())["head"]["pid"]
    try:
        assert deployed["replicas"] == ["a/0", "b/0", "b/1"]
        assert deployed["url"] == f"http://127.0.0.1:{port}"
        assert deployed["serve_url"] != deployed["url"]
        for url in (deployed["url"], deployed["serve_url"]):  # own listener, Serve's proxy
            r = httpx.post(f"{url}/v1/completions",
                           json={"model": "y-1", "prompt": "hi", "max_tokens": 2}, timeout=30)
            assert r.status_code == 200 and r.headers[REPLICA_HEADER].startswith("b/")
        # the Ray tools people reach for first see the deployment (the head runs the dashboard)
        dash = deployed["dashboard_url"]
        assert dash and httpx.get(dash, timeout=30).status_code == 200
        bin_dir = Path(sys.executable).parent
        actors = subprocess.run([str(bin_dir / "ray"), "list", "actors", "--address", dash,
                                 "--format", "json", "--limit", "1000"], capture_output=True,
                                text=True, env=env, timeout=120)
        assert actors.returncode == 0, actors.stderr[-2000:]
        names = {a.get("class_name") for a in json.loads(actors.stdout)}
        assert "ServeController" in names and any(
            str(n).endswith("FleetController") for n in names), names
        serve_status = subprocess.run([str(bin_dir / "serve"), "status", "-a", dash],
                                      capture_output=True, text=True, env=env, timeout=120)
        assert serve_status.returncode == 0, serve_status.stderr[-2000:]
        assert "lorafleet" in serve_status.stdout and "RUNNING" in serve_status.stdout
        status = run("status")
        assert {row["replica"] for row in status["rows"]} == {"a/0", "b/0", "b/1"}
        assert sum(row["requests"] for row in status["rows"]) == 2
        assert status["controller"]["replanning"].startswith("re-planning is off")
        refused = subprocess.run([*cli, "whatif", "--rate-scale", "2", *state],
                                 capture_output=True, text=True, env=env, timeout=300,
                                 cwd=tmp_path)
        assert refused.returncode == 2 and "--predictor" in refused.stderr, refused.stderr
        tree = [head_pid, *(c.pid for c in psutil.Process(head_pid).children(recursive=True))]
    finally:
        down = run("shutdown")
    assert down["leftover_pids"] == [] and down["head_pid"] == head_pid
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in tree)
    assert not (tmp_path / "state" / "deploy.json").exists()


def test_openloop_generator_measures_per_replica_and_writes_a_row(sim_app, tmp_path) -> None:
    import csv

    from load_tests.openloop import build_openloop_row, run_openloop
    from orchestrator.measure.bench import MEASURED_COLUMNS, append_row
    from twin.workload import Workload

    plan, _, url = sim_app
    workload = Workload.from_yaml(Path(__file__).parent.parent / "examples"
                                  / "workload_cpu_light.yaml").scaled(4.0)
    res = asyncio.run(run_openloop(workload, url, 6.0, seed=3))
    m = res.metrics
    assert res.engine == "sim" and not res.errors
    assert m["offered_requests"] == len(res.batch) > 10
    assert m["completed"] >= 0.8 * m["offered_requests"] and m["ttft_median_ms"] > 0
    for rid in res.per_replica:  # every replica that served is one the plan routes to
        assert any(rid.split("/")[0] in {r.group for r in plan.routing[a.id]}
                   for a in workload.adapters)
    assert sum(v["completed"] for v in res.per_replica.values()) == m["completed"]
    row = build_openloop_row(res, url=url, seed=3, model_name="tiny-llama-cpu")
    append_row(tmp_path / "runs.csv", row)
    with open(tmp_path / "runs.csv") as f:
        (read,) = list(csv.DictReader(f))
    assert set(MEASURED_COLUMNS) <= set(read) and int(read["completed"]) == m["completed"]
    assert json.loads(read["workload_json"])["name"] == workload.name


def test_locustfile_drives_the_deployment(sim_app, tmp_path) -> None:
    import csv

    _, _, url = sim_app
    root = Path(__file__).parent.parent
    env = {**os.environ, "LORAFLEET_WORKLOAD": str(root / "examples" / "workload_cpu_light.yaml")}
    before = settled_served(url)  # an earlier test's stragglers are not locust's
    res = subprocess.run(
        [str(Path(sys.executable).with_name("locust")), "-f", str(root / "load_tests"
                                                                  / "locustfile.py"),
         "--headless", "-u", "4", "-r", "4", "-t", "5s", "--host", url, "--only-summary",
         "--csv", str(tmp_path / "loc")], capture_output=True, text=True, env=env, timeout=120,
        cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    served = settled_served(url) - before
    with open(tmp_path / "loc_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows.pop("Aggregated")
    # one row per replica that served, one event per request: locust's count is the ingress's
    # (less the requests locust cut off at its time limit, one per user at most)
    assert rows and all(re.fullmatch(r"/v1/completions \[(group-\d|hot)/\d\]", n) for n in rows)
    assert sum(int(r["Request Count"]) for r in rows.values()) == int(total["Request Count"])
    assert served - 4 <= int(total["Request Count"]) <= served, (served, total["Request Count"])
    assert int(total["Request Count"]) > 5 and int(total["Failure Count"]) == 0


def settled_served(url: str, max_s: float = 180.0) -> float:
    """``served_total`` once nothing is in flight at the ingress and the count stands still, so
    a window's count holds exactly the requests sent in it, however slow the host."""
    deadline = time.monotonic() + max_s
    last = None
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        in_flight = sum(float(m.group(1)) for m in re.finditer(
            r'lorafleet_in_flight\{[^}]*\} ([0-9.]+)', text))
        now = served_total(url)
        if in_flight == 0 and now == last:
            return now
        last = now
        time.sleep(0.5)
    raise AssertionError(f"the ingress did not settle within {max_s:.0f} s")


def served_total(url: str) -> float:
    """Requests the ingress answered 200, from its own metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'lorafleet_requests_total\{[^}]*status="200"\} ([0-9.]+)', text))


def test_a_controller_without_cpu_for_twin_runs_answers_and_shutdown_finds_orphans(
        tmp_path: Path) -> None:
    """Issue #16, as a user met it: three sim replicas at 0.5 CPU on a 2-CPU cluster leave no
    CPU for twin tasks. `whatif` still answers (the twin runs in the controller, an event says
    why). After the controller is killed for good, `status` is a clear error naming what still
    runs, and `shutdown` of a cluster deploy did not start removes every lorafleet application
    itself and keeps nothing running."""
    from orchestrator.control.cluster import LocalHead, free_port

    plan = synthetic_plan([GroupShape("a", [("x-1", 8), ("x-2", 16)]),
                           GroupShape("b", [("y-1", 8)], copies=2)])
    plan.to_yaml(tmp_path / "plan.yaml")
    head = LocalHead.start(num_cpus=2, log_dir=tmp_path / "head")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cli = [sys.executable, "-m", "orchestrator.cli"]
    state = ["--state-dir", str(tmp_path / "state")]

    def run(*args: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        res = subprocess.run([*cli, *args, *state], capture_output=True, text=True, env=env,
                             timeout=timeout, cwd=tmp_path)
        assert (res.returncode == 0) == ok, (res.returncode, res.stderr[-3000:])
        return res

    def on_cluster(code: str) -> str:
        res = subprocess.run([sys.executable, "-c", "import ray, json\n"
                              f"ray.init(address={head.address!r}, logging_level='ERROR')\n"
                              + code], capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    try:
        port = free_port()
        run("deploy", str(tmp_path / "plan.yaml"), "--engine", "sim", "--port", str(port),
            "--address", head.address, "--replica-cpus", "0.5", "--predictor", "analytic",
            "--control-window", "12", "--check-interval", "1", "--verify-window", "60",
            "--json")
        url = f"http://127.0.0.1:{port}"
        for i in range(40):  # ~16 s of light traffic: the estimate needs a covered window
            r = httpx.post(f"{url}/v1/completions", json={
                "model": ["x-1", "y-1"][i % 2], "prompt": [5] * 8, "max_tokens": 2}, timeout=30)
            assert r.status_code == 200
            time.sleep(0.4)
        t0 = time.monotonic()
        out = json.loads(run("whatif", "--rate-scale", "2", "--json",
                             timeout=240).stdout.strip().splitlines()[-1])
        assert out["replicas"] >= 1 and time.monotonic() - t0 < 180
        status = json.loads(run("status", "--json").stdout.strip().splitlines()[-1])
        local = [e for e in status["controller"]["events"] if e["kind"] == "twin_local"]
        assert local and "no CPU free" in local[0]["reason"], status["controller"]["events"]

        on_cluster("a = ray.get_actor('lorafleet-controller', namespace='lorafleet')\n"
                   "ray.kill(a, no_restart=True)")
        dead = run("status", ok=False)
        assert dead.returncode == 2 and "not running" in dead.stderr
        assert "lorafleet shutdown" in dead.stderr and "lorafleet-e" in dead.stderr
        down = json.loads(run("shutdown", "--json").stdout.strip().splitlines()[-1])
        assert down["remaining_apps"] == [] and len(down["deleted_apps"]) == 4  # 3 + ingress
        apps = json.loads(on_cluster("from ray import serve\n"
                                     "print(json.dumps(list(serve.status().applications)))"))
        assert not [a for a in apps if a.startswith("lorafleet")], apps
        assert not (tmp_path / "state" / "deploy.json").exists()
    finally:
        head.stop()


@pytest.mark.parametrize("via", ["listener", "serve_proxy"])
def test_the_edge_on_serve_limits_and_a_client_gone(sim_app, ray_cluster, via: str) -> None:
    """Through Ray Serve: a body over the limit is a 413 naming it (not a replica failure, not
    retried); a non-streamed request whose client leaves is aborted on the engine replica (the
    cancel crosses the handle call), which records it as not served."""
    from orchestrator.control.deploy import DeployState, collect_reports

    plan, path, url = sim_app
    url = url if via == "listener" else ray_cluster.url
    adapter = plan.group("group-2").adapters[5].id
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": adapter, "prompt": [7] * (3 * 2**20 // 2), "max_tokens": 2})
    assert r.status_code == 413, r.text[:300]
    assert "2097152 bytes" in r.json()["error"]["message"]

    state = DeployState(address=ray_cluster.address, url=url, engine="sim", plan_path=str(path),
                        app_name="lorafleet", replicas=["group-2/0"],
                        deployments={"group-2/0": "engine-group-2-0"})
    errors0 = collect_reports(state, window_s=300)["group-2/0"]["total_errors"]
    with pytest.raises(httpx.TimeoutException):  # 500 tokens: seconds on the sim
        httpx.post(f"{url}/v1/completions", timeout=0.5, json={
            "model": adapter, "prompt": [7] * 8, "max_tokens": 500})
    deadline = time.monotonic() + 60
    while True:
        rep = collect_reports(state, window_s=300)["group-2/0"]
        if rep["total_errors"] > errors0 and rep["running"] == 0:
            break  # aborted: had it run to the end it would be counted completed, not failed
        assert time.monotonic() < deadline, f"the engine request was not aborted: {rep}"
        time.sleep(0.5)


def test_serving_path_stamps_and_fit_on_the_sim(sim_app) -> None:
    """The stamps come in hop order, only when asked for; and the serving-path fit, run on a
    sim replica (the twin's own engine in real time), gives a term with which the twin's
    replay is the measurement."""
    from load_tests.openloop import STAMPS, run_openloop
    from orchestrator.measure.serving_path import HOPS, fit_window
    from twin.profile import load_profile
    from twin.workload import Workload

    plan, _, url = sim_app
    body = {"model": "adapter-0001", "prompt": [11] * 16, "max_tokens": 4, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        plain = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert plain[-1] == "data: [DONE]" and not any("lorafleet_timing" in ln for ln in plain)
    workload = Workload.from_yaml(Path(__file__).parent.parent / "examples"
                                  / "workload_cpu_calibrate.yaml").scaled(2.0)
    res = asyncio.run(run_openloop(workload, url, 15.0, seed=4, timing=True))
    assert not res.errors and res.stamps is not None
    done = np.isfinite(res.meas.finish_s)
    assert done.sum() > 40
    order = np.stack([res.stamps[k][done] for k in STAMPS])
    assert np.isfinite(order).all()  # every completed request was stamped at every hop
    assert (np.diff(order, axis=0) > -2e-3).all()  # in hop order (clock reads: 2 ms slack)
    run = fit_window([res], plan, load_profile("tiny-llama-cpu"), source="test")
    assert set(run.term.breakdown_ms) == {h[0] for h in HOPS}
    # the requests with a first token in the window (some of them cut at its end)
    assert int(done.sum()) <= run.term.fitted_on <= int(np.isfinite(res.meas.first_token_s).sum())
    # with the fitted term, the replay is the measurement up to the window's noise: first
    # tokens (the path) and decoding (the sim runs the profile's serving-time steps)
    for key in ("ttft_median_ms", "tpot_mean_ms"):
        measured, replayed = res.metrics[key], run.replayed[key]
        assert abs(replayed - measured) <= max(0.3 * measured, 5.0), (key, replayed, measured)
