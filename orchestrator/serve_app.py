"""The Ray Serve application of a plan: one ingress + one engine deployment per replica copy.

Topology (DESIGN §5): the ingress deployment runs the FastAPI app of orchestrator/ingress.py and
calls the engines through Serve deployment handles. Each *copy* of a replica group is its own
deployment (``engine-<group>-<copy>``, ``num_replicas=1``) rather than ``num_replicas=copies`` of
one: the ingress then chooses the copy itself (least in flight, orchestrator/routing.py) and knows
exactly which replica served a request - the ``x-lorafleet-replica`` header is the replica's own
report, not a guess about Serve's internal router.

``build_app(args)`` is the application builder Ray Serve imports
(``orchestrator.serve_app:build_app``, used by the KubeRay RayService with ``plan_path``);
``build_application(spec)`` is what ``lorafleet deploy`` and the tests call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from orchestrator.api_keys import ApiKeys
from orchestrator.engine_backend import GenerateRequest
from orchestrator.ingress import IngressCore, build_api
from orchestrator.replica import ReplicaCore, ReplicaSpec
from orchestrator.routing import ReplicaId, RoutingTable
from orchestrator.serving_spec import ServingSpec

APP_NAME = "lorafleet"
INGRESS_NAME = "ingress"
MAX_ONGOING = 4096  # engines queue internally; Serve's default (5) would cap batching


@serve.deployment(max_ongoing_requests=MAX_ONGOING, health_check_period_s=10,
                  health_check_timeout_s=60, graceful_shutdown_timeout_s=30)
class EngineDeployment:
    """One engine replica (vllm or sim) holding one group's adapters."""

    async def __init__(self, spec: ReplicaSpec) -> None:
        self.core = ReplicaCore(spec)
        await self.core.start()

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        async for item in self.core.stream(request):
            yield item

    async def complete(self, request: GenerateRequest) -> dict[str, Any]:
        return await self.core.complete(request)

    async def report(self, window_s: float | None = None) -> dict[str, Any]:
        return self.core.report(window_s)

    async def check_health(self) -> None:
        await self.core.backend.check_health()

    async def __del__(self) -> None:
        await self.core.stop()


class HandleClient:
    """``ReplicaClient`` over a Serve deployment handle (orchestrator/ingress.py)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._complete = handle.options(method_name="complete")
        self._stream = handle.options(method_name="stream", stream=True)
        self._report = handle.options(method_name="report")

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        gen = self._stream.remote(request)
        done = False
        try:
            async for item in gen:
                yield item
            done = True
        finally:
            if not done:
                gen.cancel()

    async def complete(self, request: GenerateRequest) -> dict[str, Any]:
        return await self._complete.remote(request)

    async def report(self) -> dict[str, Any]:
        return await self._report.remote()


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class IngressDeployment:
    """The HTTP ingress: routing table + handles; the FastAPI app is built per replica."""

    def __init__(self, routing: Mapping[str, Any], engine: str, api_keys: Mapping[str, Any],
                 timeout_s: float, handles: Mapping[str, DeploymentHandle]) -> None:
        table = RoutingTable(routing["routes"], routing["copies"],
                             base_model=routing["base_model"])
        clients = {ReplicaId(g, int(c)): HandleClient(h)
                   for key, h in handles.items() for g, c in [key.rsplit("/", 1)]}
        self.core = IngressCore(table, clients, engine=engine,
                                api_keys=ApiKeys.from_dict(api_keys or None),
                                timeout_s=timeout_s)

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self.core)


def engine_options(spec: ServingSpec, replica: ReplicaSpec) -> dict[str, Any]:
    """Deployment options of one engine copy: its name and the resources it reserves."""
    actor: dict[str, Any] = {"num_cpus": spec.replica_cpus}
    if spec.replica_gpus:
        actor["num_gpus"] = spec.replica_gpus
    if replica.engine_kind == "vllm":
        from orchestrator.vllm_engine import engine_env

        actor["runtime_env"] = {"env_vars": engine_env(replica)}
    return {"name": replica.replica_id.deployment, "num_replicas": 1,
            "ray_actor_options": actor}


def build_application(spec: ServingSpec) -> Any:
    """The bound Serve application for ``spec`` (not yet running)."""
    table = spec.routing_table()
    handles = {}
    for r in spec.replica_specs():
        handles[str(r.replica_id)] = EngineDeployment.options(**engine_options(spec, r)).bind(r)
    routing = {"routes": {a: list(rs) for a, rs in table.routes.items()},
               "copies": dict(table.copies), "base_model": table.base_model}
    return IngressDeployment.options(
        name=INGRESS_NAME, num_replicas=spec.ingress_replicas,
    ).bind(routing, spec.engine, spec.api_keys.to_dict() if spec.api_keys.enabled else None,
           spec.timeout_s, handles)


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder (``import_path: orchestrator.serve_app:build_app``)."""
    return build_application(ServingSpec.from_args(args))


def run_application(spec: ServingSpec, *, name: str = APP_NAME, route_prefix: str = "/") -> None:
    """``serve.run`` the plan's application on the connected cluster; waits until it is ready
    and raises with every failing replica's message otherwise."""
    from orchestrator.deploy import DeployError, deployment_messages

    try:
        serve.run(build_application(spec), name=name, route_prefix=route_prefix,
                  blocking=False)
    except RuntimeError as exc:
        raise DeployError(f"{exc}\n{deployment_messages(name)}") from None
