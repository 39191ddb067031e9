"""The Ray Serve application of a plan: one ingress + one engine deployment per replica copy.

Topology (DESIGN §5): the ingress deployment runs the FastAPI app of serving/ingress.py and
calls the engines through Serve deployment handles. Each *copy* of a replica group is its own
deployment (``engine-<group>-<copy>``, ``num_replicas=1``) rather than ``num_replicas=copies``
of one: the ingress then chooses the copy itself (serving/routing.py) and knows exactly which
replica served a request - the ``x-lorafleet-replica`` header is the replica's own report, not
a guess about Serve's internal router.

Two ways to run it. ``lorafleet deploy`` starts the controller (control/actor.py), which deploys
every engine copy as its own Serve application (``engine_app``: one ``ENGINE_DEPLOYMENT`` each,
so replicas come and go one by one) and the ingress application (``managed_ingress_app``),
which pulls routing tables from the controller; both reach it through serving/controller_link.py.
``build_app(args)`` is the static application builder Ray Serve imports
(``orchestrator.serving.app:build_app``, used by the KubeRay RayService with ``plan_path``):
ingress and engines in one application, the plan as deployed, no controller;
``build_application(spec)`` builds the same for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from orchestrator.serving.api_keys import ApiKeys
from orchestrator.serving.backend import GenerateRequest
from orchestrator.serving.controller_link import ControllerLink
from orchestrator.serving.ingress import IngressCore, build_api
from orchestrator.serving.listener import Listener
from orchestrator.serving.openai_schema import DEFAULT_MAX_BODY_BYTES
from orchestrator.serving.registry import AdapterEntry
from orchestrator.serving.replica import ReplicaCore
from orchestrator.serving.routing import ReplicaId, RoutingTable
from orchestrator.serving.spec import ReplicaSpec, ServingSpec
from orchestrator.serving.vllm_engine import engine_env

APP_NAME = "lorafleet"
INGRESS_NAME = "ingress"
MAX_ONGOING = 4096  # engines queue internally; Serve's default (5) would cap batching
ENGINE_DEPLOYMENT = "engine"  # the deployment inside each controller-managed engine app
PUSH_INTERVAL_S = 1.0  # engine -> controller telemetry batches
ROUTING_POLL_S = 0.25  # ingress -> controller routing polls


@serve.deployment(max_ongoing_requests=MAX_ONGOING, health_check_period_s=10,
                  health_check_timeout_s=60, graceful_shutdown_timeout_s=30)
class EngineDeployment:
    """One engine replica (vllm or sim) holding one group's adapters.

    Under a controller (``controller=(name, namespace)``) it is its own Serve application (the
    ``endpoint``), pushes a telemetry batch every ``PUSH_INTERVAL_S`` and keeps the plan and
    routing version it was last assigned, from which a restarted controller recovers.
    """

    async def __init__(self, spec: ReplicaSpec, controller: tuple[str, str] | None = None,
                       endpoint: str | None = None) -> None:
        self.endpoint = endpoint or str(spec.replica_id)
        link = ControllerLink(*controller) if controller is not None else None
        if link is not None:
            spec = await _current_role(link, self.endpoint) or spec
        self.core = ReplicaCore(spec)
        await self.core.start()
        self.stamp_: dict[str, Any] = {"version": 0}  # set by the controller (recovery)
        self._push: asyncio.Task | None = None
        if link is not None:
            self._push = asyncio.get_running_loop().create_task(self._push_loop(link))

    async def _push_loop(self, link: ControllerLink) -> None:
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            batch = self.core.take_batch(self.endpoint)
            with contextlib.suppress(Exception):  # controller away: this interval is lost,
                await link.push_served(batch)  # and its coverage check will know

    async def stream(self, request: GenerateRequest, whole: bool = False
                     ) -> AsyncIterator[dict[str, Any]]:
        source = self.core.stream_whole(request) if whole else self.core.stream(request)
        async for item in source:
            yield item

    async def report(self, window_s: float | None = None) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "version": self.stamp_["version"],
                "node_id": ray.get_runtime_context().get_node_id(),  # where it runs (status)
                **self.core.report(window_s)}

    async def assign(self, role: Mapping[str, Any], adapters: Sequence[AdapterEntry]
                     ) -> dict[str, Any]:
        return await self.core.assign(role["group"], int(role["copy"]), adapters,
                                      role.get("predicted"))

    async def stamp(self, stamp: Mapping[str, Any]) -> None:
        """The plan, routing version and fleet this replica serves under: a restarted
        controller recovers from the newest stamp)."""
        self.stamp_ = dict(stamp)

    async def describe(self) -> dict[str, Any]:
        return {**self.stamp_, "endpoint": self.endpoint}

    async def check_health(self) -> None:
        await self.core.backend.check_health()

    async def __del__(self) -> None:
        if self._push is not None:
            self._push.cancel()
        await self.core.stop()


async def _current_role(link: ControllerLink, endpoint: str) -> ReplicaSpec | None:
    """The role the controller has for ``endpoint`` now. Serve re-creates a crashed replica
    with its original arguments; a replica re-targeted since then must come back with its
    current adapters, not those it was first deployed with. None when the controller does not
    know the endpoint yet (a new engine) or cannot be reached (it re-assigns later)."""
    try:
        return await link.current_role(endpoint)
    except Exception:
        return None


# Requests go to the engine replica over its inter-deployment gRPC server, pickled, instead of
# through Ray's object store (Serve's default): 1-token completions on the 2-core machines,
# 4.1-4.7 ms p50 vs 5.2-6.2 ms (benchmarks/router_overhead.py reports both).
HANDLE_TRANSPORT: dict[str, Any] = {"_by_reference": False, "request_serialization": "pickle",
                                    "response_serialization": "pickle"}

# The ingress's code never blocks, so its replica runs it - and its handles' router - on the
# replica's own event loop instead of two extra threads (Ray Serve's defaults), which saves
# thread hops on every request. Engine replicas keep the defaults (an engine may block).
INGRESS_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
               "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


class HandleClient:
    """``ReplicaClient`` over a Serve deployment handle (orchestrator/serving/ingress.py)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._stream = handle.options(method_name="stream", stream=True, **HANDLE_TRANSPORT)
        self._report = handle.options(method_name="report")

    async def stream(self, request: GenerateRequest, whole: bool = False
                     ) -> AsyncIterator[dict[str, Any]]:
        gen = self._stream.remote(request, whole)
        done = False
        try:
            async for item in gen:
                yield item
            done = True
        finally:
            if not done:
                gen.cancel()

    async def report(self) -> dict[str, Any]:
        return await self._report.remote()


@serve.deployment(max_ongoing_requests=MAX_ONGOING)  # actor options: ingress_options()
@serve.ingress()
class IngressDeployment:
    """The HTTP ingress: routing table + handles; the FastAPI app is built per replica.

    Static (``handles`` given: one application holds ingress and engines) or managed by the
    controller (``controller`` given): the routing table names each copy's engine application,
    and the ingress polls the controller for newer tables every ``ROUTING_POLL_S``, swapping
    them in atomically and reporting what it still has in flight under older ones. With
    ``listen`` (host, port) the replica also serves the app itself there
    (orchestrator/serving/listener.py); Serve's proxy serves it either way.
    """

    def __init__(self, routing: Mapping[str, Any], engine: str, api_keys: Mapping[str, Any],
                 timeout_s: float, handles: Mapping[str, DeploymentHandle] | None = None,
                 controller: tuple[str, str] | None = None,
                 listen: tuple[str, int] | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        table = _table(routing)
        keys = ApiKeys.from_dict(api_keys or None)
        self._poll: asyncio.Task | None = None
        if controller is None:
            clients = {ReplicaId(g, int(c)): HandleClient(h)
                       for key, h in (handles or {}).items() for g, c in [key.rsplit("/", 1)]}
            self.core = IngressCore(table, clients, engine=engine, api_keys=keys,
                                    timeout_s=timeout_s, max_body_bytes=max_body_bytes)
        else:
            ends, clients = self._endpoints(routing, {})
            self.core = IngressCore(table, clients, engine=engine, api_keys=keys,
                                    timeout_s=timeout_s, endpoints=ends,
                                    version=int(routing["version"]),
                                    max_body_bytes=max_body_bytes)
            self._poll = asyncio.get_event_loop().create_task(
                self._poll_loop(ControllerLink(*controller)))
        self._api = build_api(self.core)
        self._listener = Listener.start(self._api, *listen) if listen else None

    @staticmethod
    def _endpoints(routing: Mapping[str, Any], known: Mapping[Any, Any]
                   ) -> tuple[dict[ReplicaId, str], dict[str, Any]]:
        ends: dict[ReplicaId, str] = {}
        clients: dict[str, Any] = {}
        for key, ep in routing["endpoints"].items():
            g, c = key.rsplit("/", 1)
            ends[ReplicaId(g, int(c))] = ep
            # no existence check: it is a blocking call to the Serve controller on the
            # ingress's event loop, which serves clients too, and the controller only routes
            # to engine applications it has deployed
            clients[ep] = known.get(ep) or HandleClient(serve.get_deployment_handle(
                ENGINE_DEPLOYMENT, app_name=ep, _check_exists=False))
        return ends, clients

    async def _poll_loop(self, link: ControllerLink) -> None:
        """Poll for routing tables; every ``PUSH_INTERVAL_S`` also push the offered load this
        ingress counted (arrivals per adapter, each client request once) - what the
        controller's workload estimate reads. A push that fails is lost, like an engine's: the
        controller sees the gap in this ingress's coverage and does not re-plan on it."""
        me = serve.get_replica_context().replica_id.unique_id
        last_push = time.monotonic()
        while True:
            await asyncio.sleep(ROUTING_POLL_S)
            try:
                if time.monotonic() - last_push >= PUSH_INTERVAL_S:
                    last_push = time.monotonic()
                    await link.push_offered(self.core.take_offered(me))
                update = await link.routing_update(me, self.core.drain_state())
            except Exception:  # controller away: keep routing by the table we have
                continue
            if update:
                ends, clients = self._endpoints(update, self.core.clients)
                self.core.swap(_table(update), clients, ends, int(update["version"]))

    def __serve_build_asgi_app__(self) -> Any:
        return self._api

    async def __del__(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
        if self._listener is not None:
            await self._listener.stop()


def _table(routing: Mapping[str, Any]) -> RoutingTable:
    return RoutingTable(routing["routes"], routing["copies"], base_model=routing["base_model"])


def engine_options(spec: ServingSpec, replica: ReplicaSpec) -> dict[str, Any]:
    """Deployment options of one engine copy: its name and the resources it reserves."""
    actor: dict[str, Any] = {"num_cpus": spec.replica_cpus}
    if spec.gpus_per_replica:
        actor["num_gpus"] = spec.gpus_per_replica
        if spec.accelerator_type:
            actor["accelerator_type"] = spec.accelerator_type
    if replica.engine_kind == "vllm":
        actor["runtime_env"] = {"env_vars": engine_env(replica)}
    return {"name": replica.replica_id.deployment, "num_replicas": 1,
            "ray_actor_options": actor}


def ingress_options(spec: ServingSpec) -> dict[str, Any]:
    """Deployment options of the ingress. A listening ingress runs on the head node, so the
    address ``lorafleet deploy`` prints is where it listens (its replicas share the port)."""
    actor: dict[str, Any] = {"num_cpus": 0.1, "runtime_env": {"env_vars": dict(INGRESS_ENV)}}
    if spec.listen is not None:
        actor["resources"] = {"node:__internal_head__": 0.001}
    return {"name": INGRESS_NAME, "num_replicas": spec.ingress_replicas,
            "ray_actor_options": actor}


def build_application(spec: ServingSpec) -> Any:
    """The bound Serve application for ``spec`` (not yet running)."""
    table = spec.routing_table()
    handles = {}
    for r in spec.replica_specs():
        handles[str(r.replica_id)] = EngineDeployment.options(**engine_options(spec, r)).bind(r)
    routing = {"routes": {a: list(rs) for a, rs in table.routes.items()},
               "copies": dict(table.copies), "base_model": table.base_model}
    return IngressDeployment.options(**ingress_options(spec)).bind(
        routing, spec.engine, spec.api_keys.to_dict() if spec.api_keys.enabled else None,
        spec.timeout_s, handles, None, spec.listen, spec.max_body_bytes)


def engine_app(spec: ServingSpec, replica: ReplicaSpec, endpoint: str,
               controller: tuple[str, str]) -> Any:
    """One controller-managed engine replica: its own Serve application named ``endpoint``."""
    opts = engine_options(spec, replica)
    opts["name"] = ENGINE_DEPLOYMENT
    return EngineDeployment.options(**opts).bind(replica, controller, endpoint)


def managed_ingress_app(spec: ServingSpec, routing: Mapping[str, Any],
                        controller: tuple[str, str]) -> Any:
    """The ingress application of a controller-managed deployment."""
    return IngressDeployment.options(**ingress_options(spec)).bind(
        dict(routing), spec.engine, spec.api_keys.to_dict() if spec.api_keys.enabled else None,
        spec.timeout_s, None, controller, spec.listen, spec.max_body_bytes)


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder (``import_path: orchestrator.serving.app:build_app``).
    Without ``replica_gpus`` the engines ask for GPUs when the cluster has some now (a
    RayService whose GPU workers scale from zero sets it: the manifest does)."""
    spec = ServingSpec.from_args(args)
    if spec.replica_gpus is None and ray.is_initialized():
        spec = spec.for_cluster(ray.cluster_resources().get("GPU", 0.0))
    return build_application(spec)


class ServeError(RuntimeError):
    """A Serve application that cannot start or run; the message says what failed and why."""


def deployment_messages(app_name: str) -> str:
    """Serve's status message of every unhealthy deployment (the replica's traceback)."""
    try:
        app = serve.status().applications[app_name]
    except Exception:  # not deployed (any more): nothing to tell
        return ""
    return "\n".join(f"{name}: {d.status}: {d.message[-1500:]}"
                     for name, d in app.deployments.items()
                     if not str(d.status).endswith("HEALTHY"))


def run_application(spec: ServingSpec, *, name: str = APP_NAME, route_prefix: str = "/") -> None:
    """``serve.run`` the plan's application on the connected cluster; waits until it is ready
    and raises with every failing replica's message otherwise."""
    try:
        serve.run(build_application(spec), name=name, route_prefix=route_prefix,
                  blocking=False)
    except RuntimeError as exc:
        raise ServeError(f"{exc}\n{deployment_messages(name)}") from None
