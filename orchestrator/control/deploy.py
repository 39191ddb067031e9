"""Run a plan as a service that outlives the CLI, find it again, and stop it cleanly.

``deploy``: without ``--address``, start a private local Ray head (control/cluster.py), connect,
start the controller (which deploys the engines and the ingress) and write a state file
(``.lorafleet/deploy.json`` in the current directory, or ``$LORAFLEET_STATE_DIR/deploy.json``)
with the head's PID, ports, address, the ingress and Serve proxy URLs and the replicas. With
``--address`` (a ``ray up`` cluster) it only connects and deploys.

``status`` reads the state file, connects and asks the controller and every engine replica for
their figures. ``shutdown`` stops the controller, deletes every lorafleet Serve application it
finds by name and, if deploy started the head, stops exactly that process tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from orchestrator.control.actor import get_controller, start_controller
from orchestrator.control.cluster import (
    LocalHead,
    connect,
    descendants,
    disconnect,
    free_port,
    pid_alive,
)
from orchestrator.control.controller import (
    CONTROLLER_NAME,
    ENGINE_APP_PREFIX,
    ControllerSettings,
)
from orchestrator.serving.app import (
    APP_NAME,
    ENGINE_DEPLOYMENT,
    ServeError,
    build_application,
)

STATE_ENV = "LORAFLEET_STATE_DIR"
STATE_FILE = "deploy.json"


class DeployError(ServeError):
    """Deploy/status/shutdown cannot proceed; the message says what to do."""


def state_path(state_dir: str | Path | None = None) -> Path:
    base = Path(state_dir or os.environ.get(STATE_ENV) or Path.cwd() / ".lorafleet")
    return base / STATE_FILE


# ----------------------------------------------------------------------------- state file
@dataclass
class DeployState:
    address: str
    url: str  # the ingress's own listener
    engine: str
    plan_path: str
    app_name: str
    replicas: list[str]  # "group/copy"
    deployments: dict[str, str]  # "group/copy" -> deployment name
    head: dict[str, Any] | None = None  # LocalHead fields when deploy started the head
    controller: str | None = None  # the controller actor's name (namespace "lorafleet")
    created_at: float = field(default_factory=time.time)
    startup_s: float = 0.0
    serve_url: str | None = None  # Ray Serve's HTTP proxy (same API, one hop more)
    dashboard_url: str | None = None  # the Ray dashboard of the head deploy started

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> DeployState:
        if not path.is_file():
            raise DeployError(f"no deployment recorded at {path}; run `lorafleet deploy` first "
                              f"(or set ${STATE_ENV})")
        return cls(**json.loads(path.read_text()))

    def local_head(self) -> LocalHead | None:
        return LocalHead(**self.head) if self.head else None


# ----------------------------------------------------------------------------- operations


def deploy(spec: Any, *, address: str | None, port: int, serve_port: int | None = None,
           state_dir: str | Path | None = None, num_cpus: float | None = None,
           settings: Any = None, dashboard: bool = True, dashboard_port: int | None = None,
           wait_for_gpus: bool = False,
           progress: Callable[[str], None] = lambda _m: None) -> DeployState:
    """Start (or connect to) Ray, start the controller, which deploys the engines and the
    ingress and keeps them right from then on; record it all; returns the state written.

    The ingress listens on ``port`` itself (serving/listener.py, the recorded ``url``);
    Ray Serve's HTTP proxy serves the same API on ``serve_port`` (default: a free port). A
    head this starts runs Ray's dashboard (``dashboard``), so ``ray list actors``, ``serve
    status`` and the dashboard's Serve page see the deployment. Engine replicas ask for the
    GPUs the cluster has (``ServingSpec.for_cluster``); a plan needing more than exist is
    refused before anything starts, unless ``wait_for_gpus`` (an autoscaling cluster)."""
    path = state_path(state_dir)
    if path.is_file():
        old = DeployState.read(path)
        head = old.local_head()
        if head is None or head.alive():
            raise DeployError(f"a deployment is already recorded at {path} ({old.url}); run "
                              "`lorafleet shutdown` first")
    t0 = time.perf_counter()
    host = "127.0.0.1" if address is None else "0.0.0.0"
    spec = spec.with_(listen=(host, port), args={**spec.args, "listen": f"{host}:{port}"})
    serve_port = serve_port or free_port()
    if serve_port == port:
        raise DeployError(f"--serve-port {serve_port} is the ingress's --port; choose another")
    build_application(spec)  # validates everything before Ray starts
    head = None
    if address is None:
        head = LocalHead.start(num_cpus=num_cpus, log_dir=path.parent, progress=progress,
                               dashboard=dashboard, dashboard_port=dashboard_port)
        address = head.address
    try:
        connect(address)
        spec = spec.for_cluster(ray.cluster_resources().get("GPU", 0.0))
        if not wait_for_gpus:
            spec.check_gpus([n["Resources"] for n in ray.nodes() if n.get("Alive")])
        serve.start(http_options={"host": host, "port": serve_port})
        progress(f"starting the controller; it deploys {len(spec.replica_specs())} "
                 f"{spec.engine} replica(s) + the ingress on Ray Serve")
        actor = start_controller(spec, settings or ControllerSettings())

        members = ray.get(actor.status.remote())["members"]
        replicas = sorted(m["replica"] for m in members.values())
        where = "127.0.0.1" if head else head_host(address)
        where = f"[{where}]" if ":" in where else where  # IPv6 in a URL
        url = f"http://{where}:{port}"
        wait_http(f"{url}/health", timeout_s=120)
        state = DeployState(
            address=address, url=url, serve_url=f"http://{where}:{serve_port}",
            engine=spec.engine,
            plan_path=spec.plan_path, app_name=APP_NAME, replicas=replicas,
            deployments={m["replica"]: ep for ep, m in members.items()},
            head=asdict(head) if head else None, controller=CONTROLLER_NAME,
            startup_s=time.perf_counter() - t0,
            dashboard_url=head.dashboard_url if head else None,
        )
        if head:
            head.descendants = descendants(head.pid)
            state.head = asdict(head)
        state.write(path)
        return state
    except BaseException:
        if head is not None:
            disconnect()
            head.stop()
        raise


def head_host(address: str) -> str:
    """The head's host in a Ray address (``HOST:6379``, ``ray://HOST:10001``): where a
    listening ingress runs (it is placed on the head node)."""
    if address in ("auto", "local"):  # a cluster already running on this machine
        return "127.0.0.1"
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host or "127.0.0.1"


def wait_http(url: str, timeout_s: float) -> None:
    """Until ``GET url`` answers 200; DeployError naming the URL otherwise."""

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise DeployError(f"the ingress did not answer at {url} within {timeout_s:g} s ({last})")


def lorafleet_apps() -> list[str]:
    """Every Serve application lorafleet runs on the connected cluster: the ingress and each
    controller-managed engine (found by name, whether or not a controller still knows them)."""


    return sorted(n for n in serve.status().applications
                  if n == APP_NAME or n.startswith(ENGINE_APP_PREFIX))


def live_controller(state: DeployState) -> Any:
    """The deployment's controller actor, or a DeployError that says what still runs without
    it and how to remove it (a controller killed without restart leaves its engines running:
    on a GPU cluster, GPUs nobody manages)."""

    connect(state.address)
    try:
        return get_controller(state.controller)
    except ValueError:
        apps = lorafleet_apps()
        running = (f"{len(apps)} lorafleet Serve application(s) still run "
                   f"({', '.join(apps[:6])}{' ...' if len(apps) > 6 else ''})" if apps
                   else "no lorafleet application runs")
        raise DeployError(f"the controller {state.controller!r} is not running (it was killed "
                          f"and not restarted); {running}. `lorafleet shutdown` removes them; "
                          "then deploy again") from None


def collect_reports(state: DeployState, window_s: float | None = None) -> dict[str, Any]:
    """Every engine replica's telemetry report (see ReplicaCore.report), keyed "group/copy".
    Under a controller the replicas are the ones it runs now, not those recorded at deploy."""

    connect(state.address)
    handles: dict[str, Any] = {}
    if state.controller:


        members = ray.get(live_controller(state).status.remote(), timeout=60)["members"]
        for ep, m in members.items():
            handles[m["replica"]] = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=ep)
    else:
        for rid, dep in state.deployments.items():
            handles[rid] = serve.get_deployment_handle(dep, app_name=state.app_name)
    responses = {rid: h.report.remote(window_s) for rid, h in handles.items()}
    out: dict[str, Any] = {}
    for rid, resp in responses.items():
        try:
            out[rid] = resp.result(timeout_s=30)
        except Exception as exc:
            out[rid] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def controller_status(state: DeployState) -> dict[str, Any] | None:
    """The controller's own view (version, last check, live vs predicted, events)."""
    if not state.controller:
        return None

    return ray.get(live_controller(state).status.remote(), timeout=60)


def _stop_controller(name: str, progress: Callable[[str], None]) -> None:
    """Have the controller delete every engine it runs, then end it (no restart)."""


    try:
        actor = get_controller(name)
    except ValueError:
        return  # already gone
    progress("stopping the controller and its engine replicas")
    try:
        ray.get(actor.shutdown.remote(), timeout=300)
    finally:
        ray.kill(actor, no_restart=True)


def shutdown(state_dir: str | Path | None = None,
             progress: Callable[[str], None] = lambda _m: None,
             timeout_s: float = 120.0) -> dict[str, Any]:
    """Stop the controller, delete every lorafleet Serve application it left (found by name,
    so engines of a dead controller go too), stop the head ``deploy`` started, and remove the
    state file - only once nothing lorafleet started is left (``remaining_apps`` otherwise,
    and the state file stays so a second ``shutdown`` can finish the job)."""
    path = state_path(state_dir)
    state = DeployState.read(path)
    head = state.local_head()
    result: dict[str, Any] = {"address": state.address, "head_pid": head.pid if head else None}
    remaining: list[str] = []
    if head is None or head.alive():
        try:

            connect(state.address)
            if state.controller:
                _stop_controller(state.controller, progress)
            apps = lorafleet_apps()
            progress(f"deleting {len(apps)} Serve application(s)")
            for name in apps:
                serve.delete(name, _blocking=False)
            deadline = time.monotonic() + timeout_s
            while (remaining := lorafleet_apps()) and time.monotonic() < deadline:
                time.sleep(0.5)
            result["deleted_apps"] = apps
            if head is not None:
                serve.shutdown()
        except Exception as exc:  # the cluster may already be gone
            result["serve_error"] = f"{type(exc).__name__}: {exc}"
            if head is None:  # a remote cluster we could not clean: say so, keep the record
                remaining = ["(unknown: could not reach the cluster)"]
        disconnect()
    if head is not None:
        progress(f"stopping the Ray head (pid {head.pid})")
        killed = head.stop()
        result["killed"] = killed
        leftovers = [p for p in head.descendants if pid_alive(p)]
        result["leftover_pids"] = leftovers
        remaining = []  # the head and everything on it are gone
    result["remaining_apps"] = remaining
    if not remaining:
        path.unlink(missing_ok=True)
    return result


@contextlib.contextmanager
def local_deployment(spec: Any, state_dir: str | Path, *, settings: Any = None,
                     progress: Callable[[str], None] = lambda _m: None,
                     shut_down: Callable[[dict[str, Any]], None] = lambda _r: None,
                     ) -> Iterator[DeployState]:
    """``deploy`` on a private local head (no dashboard: its polling would be in what a caller
    measures) for a ``with`` block, and ``shutdown`` after it, whatever happened inside
    (``shut_down`` gets shutdown's result). For the demo and the measurements."""
    state_dir = Path(state_dir)
    try:
        yield deploy(spec, address=None, port=free_port(), state_dir=state_dir,
                     settings=settings, dashboard=False, progress=progress)
    finally:
        if (state_dir / STATE_FILE).exists():
            shut_down(shutdown(state_dir, progress=progress))
