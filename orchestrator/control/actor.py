"""The controller on Ray: its actor and what it does to a Ray Serve cluster.

``ServeOps`` implements ``controller.FleetOps`` on Ray Serve (one Serve application per engine
replica, the ingress application, stamps, the event history in Ray's key-value store);
``controller_actor_class`` is the named, detached actor that wraps ``ControllerCore`` and runs its
loop; ``start_controller`` / ``get_controller`` create or find it. The engines and ingresses
reach it through the actor methods ``orchestrator.serving.controller_link`` calls.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray import serve
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

from orchestrator.control.controller import (
    CONTROLLER_NAME,
    DESCRIBE_TIMEOUT_S,
    ENGINE_APP_PREFIX,
    NAMESPACE,
    RECOVER_RETRY_S,
    ControllerCore,
    ControllerSettings,
    FleetOps,
)
from orchestrator.control.fanout import ray_map
from orchestrator.control.transition import Member
from orchestrator.serving.app import (
    APP_NAME,
    ENGINE_DEPLOYMENT,
    deployment_messages,
    engine_app,
    managed_ingress_app,
)
from orchestrator.serving.registry import AdapterEntry
from orchestrator.serving.spec import ReplicaSpec, ServingSpec
from placement.context import PlacementContext
from placement.plan import Plan
from placement.predictors import PREDICTORS, make_predictor
from twin.profile import load_profile


class ServeOps(FleetOps):
    """``FleetOps`` on Ray Serve: one Serve application per engine replica (its endpoint)."""

    def __init__(self, core_ref: Callable[[], ControllerCore], serving: ServingSpec,
                 controller: tuple[str, str], poll_s: float = 0.25) -> None:
        self.core_ref = core_ref
        self.serving = serving
        self.controller = controller
        self.poll_s = poll_s

    def _handle(self, endpoint: str) -> Any:


        return serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=endpoint)

    def describe(self) -> list[dict[str, Any]]:

        apps = [n for n in serve.status().applications if n.startswith(ENGINE_APP_PREFIX)]
        calls = {name: self._handle(name).describe.remote() for name in apps}
        out = []
        for name, call in calls.items():
            try:
                out.append(call.result(timeout_s=DESCRIBE_TIMEOUT_S))
            except Exception:  # being replaced by Serve right now: the stamps of the others
                # still name it if it belongs; if none answers, recovery waits and retries
                out.append({"endpoint": name, "version": 0, "unreachable": True})
        return out

    def _events_key(self) -> bytes:
        return f"{self.controller[0]}/events".encode()

    def save_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        _internal_kv_put(self._events_key(), json.dumps(list(events), default=str).encode(),
                         overwrite=True, namespace=self.controller[1])

    def load_events(self) -> list[dict[str, Any]]:
        raw = _internal_kv_get(self._events_key(), namespace=self.controller[1])
        return list(json.loads(raw)) if raw else []

    def start(self, items: Sequence[tuple[str, ReplicaSpec]], timeout_s: float) -> None:


        for endpoint, spec in items:
            app = engine_app(self.serving, spec, endpoint, self.controller)
            serve._run(app, _blocking=False, name=endpoint, route_prefix=None)
        self._wait_running([ep for ep, _ in items], timeout_s)

    def _wait_running(self, names: Sequence[str], timeout_s: float) -> None:


        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            apps = serve.status().applications
            for n in list(pending):
                st = str(apps[n].status) if n in apps else "MISSING"
                if st.endswith("RUNNING"):
                    pending.discard(n)
                elif st.endswith(("DEPLOY_FAILED", "UNHEALTHY")):
                    raise RuntimeError(f"engine {n} failed to start: {apps[n].message[-800:]}\n"
                                       f"{deployment_messages(n)}")
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"engine(s) {sorted(pending)} not ready after {timeout_s:g} s")
            if pending:
                time.sleep(self.poll_s)

    def assign(self, endpoint: str, spec: ReplicaSpec, adapter_ids: frozenset[str]) -> None:
        core = self.core_ref()
        adapters = core.registry.subset(sorted(adapter_ids))
        role = {"group": spec.group, "copy": spec.copy, "predicted": dict(spec.predicted)}
        self._handle(endpoint).assign.remote(role, adapters).result(timeout_s=120)

    def stamp(self, endpoints: Sequence[str], stamp: Mapping[str, Any]) -> None:
        calls = [self._handle(ep).stamp.remote(dict(stamp)) for ep in endpoints]
        for c in calls:
            c.result(timeout_s=60)

    def publish(self, members: Sequence[Member], *, rollback: bool = False) -> int:
        raise NotImplementedError("the controller publishes (ControllerCore._publish)")

    def wait_acked(self, version: int, timeout_s: float) -> None:
        self._wait(lambda s: int(s.get("version", 0)) >= version, timeout_s,
                   f"every ingress to route by version {version}")

    def wait_drained(self, version: int, timeout_s: float) -> None:
        self._wait(lambda s: int(s.get("version", 0)) >= version
                   and int(s.get("old_in_flight", 0)) == 0, timeout_s,
                   f"requests routed before version {version} to finish")

    def _wait(self, ok: Callable[[Mapping[str, Any]], bool], timeout_s: float, what: str) -> None:
        core = self.core_ref()
        need = self.serving.ingress_replicas
        deadline = time.monotonic() + timeout_s
        while True:
            acks = core.fresh_acks()
            if len(acks) >= need and all(ok(s) for s in acks):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:g} s for {what} "
                                   f"({len(acks)} of {need} ingress(es) polling)")
            time.sleep(self.poll_s)

    def stop(self, endpoints: Sequence[str]) -> None:

        for ep in endpoints:
            serve.delete(ep, _blocking=False)

    def deploy_ingress(self, routing: Mapping[str, Any]) -> None:


        serve.run(managed_ingress_app(self.serving, routing, self.controller), name=APP_NAME,
                  route_prefix="/", blocking=False)

    def delete_ingress(self) -> None:


        serve.delete(APP_NAME)


def placement_context(serving: ServingSpec, predictor: str | None
                      ) -> tuple[PlacementContext, str | None]:
    """The context re-plans use: the deployed plan's profile, predictor and settings; plus why
    re-planning is off (a hand-made plan names no predictor and none was given), else None.
    With re-planning off the controller still estimates, detects drift and reports the gap."""

    plan = serving.plan
    profile = load_profile(plan.profile.name)
    if serving.engine == "sim":  # a sim replica is the engine alone: no vLLM frontend around it
        profile = profile.with_serving_path(None)
    name = predictor or plan.predictor
    off = None
    if name not in PREDICTORS:
        off = (f"re-planning is off: the plan was made with predictor {name!r}; deploy with "
               f"--predictor ({'|'.join(PREDICTORS)}) to let the controller re-plan")
        name = "analytic"  # only for the context's shape; never used to plan
    known = {"min_served_fraction", "target_utilisation", "max_num_seqs",
             "max_num_batched_tokens"}
    kw = {k: v for k, v in plan.settings.items() if k in known}
    return PlacementContext.for_profile(profile, make_predictor(name, profile), **kw), off


def controller_actor_class() -> Any:
    """The Ray actor class (defined lazily: importing this module needs no Ray)."""

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=64)
    class FleetController:
        """Named, detached; wraps ControllerCore and runs its loop."""

        def __init__(self, serving: ServingSpec, settings: ControllerSettings,
                     name: str = CONTROLLER_NAME, namespace: str = NAMESPACE) -> None:

            ops = ServeOps(lambda: self.core, serving, (name, namespace))
            mapper = ray_map(batch_size=settings.fanout_batch, num_cpus=settings.fanout_cpus,
                             stall_timeout_s=settings.twin_stall_s,
                             on_fallback=lambda why: self.core.event("twin_local", reason=why))
            ctx, off = placement_context(serving, settings.predictor)
            self.core = ControllerCore(serving, settings, ops, ctx, mapper, replan_off=off)
            self.loop_task: asyncio.Task | None = None

            # Ray restarted us after a crash: recover from the replicas on the first call
            self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed

        async def bootstrap(self) -> dict[str, Any]:
            out = await asyncio.to_thread(self.core.bootstrap)
            self._start_loop()
            return out

        def _start_loop(self) -> None:
            if self.loop_task is None:
                self.loop_task = asyncio.get_running_loop().create_task(self._loop())

        def _ensure_started(self) -> None:
            if self.reconstructed and self.loop_task is None:
                self.loop_task = asyncio.get_running_loop().create_task(self._recover())

        async def _recover(self) -> None:
            """Rebuild the fleet from the engines' stamps; engines that do not answer yet (a
            loaded cluster, a replica Serve is replacing) make it wait and try again."""
            wait, longest = RECOVER_RETRY_S
            while True:
                try:
                    await asyncio.to_thread(self.core.bootstrap)
                    break
                except Exception as exc:
                    self.core.event("recover_failed", error=f"{type(exc).__name__}: {exc}",
                                    retry_in_s=wait)
                await asyncio.sleep(wait)
                wait = min(longest, 2 * wait)
            await self._loop()

        async def _loop(self) -> None:
            while True:
                await asyncio.sleep(self.core.settings.check_interval_s)
                try:
                    await asyncio.to_thread(self.core.check)
                except Exception as exc:  # keep looping; the event says what broke
                    self.core.event("check_failed", error=f"{type(exc).__name__}: {exc}")

        async def ingest(self, batch: dict[str, Any]) -> None:
            self._ensure_started()
            self.core.ingest(batch)

        async def ingest_offered(self, batch: dict[str, Any]) -> None:
            self._ensure_started()
            self.core.ingest_offered(batch)

        async def routing_update(self, ingress: str, state: dict[str, Any]) -> Any:
            self._ensure_started()
            return self.core.routing_update(ingress, state)

        async def history(self, since: float = -math.inf) -> list[dict[str, Any]]:
            return self.core.history(since)

        async def role(self, endpoint: str) -> ReplicaSpec | None:
            return self.core.roles.get(endpoint)

        async def check(self) -> dict[str, Any]:
            return await asyncio.to_thread(self.core.check)

        async def status(self, n_events: int = 30) -> dict[str, Any]:
            return self.core.status(n_events)

        async def whatif(self, **kw: Any) -> dict[str, Any]:
            return await asyncio.to_thread(functools.partial(self.core.whatif, **kw))

        async def register(self, entries: list[AdapterEntry]) -> list[str]:
            return await asyncio.to_thread(self.core.register, entries)  # stamps the engines

        async def apply_plan(self, plan: dict[str, Any]) -> dict[str, Any]:
            return await asyncio.to_thread(self.core.apply_exclusive, Plan.from_dict(plan))

        async def shutdown(self) -> None:
            if self.loop_task is not None:
                self.loop_task.cancel()
            await asyncio.to_thread(self.core.shutdown)

    return FleetController


def start_controller(serving: ServingSpec, settings: ControllerSettings, *,
                     name: str = CONTROLLER_NAME, timeout_s: float = 1800.0) -> Any:
    """Create the detached controller (or find the running one) and bootstrap the fleet."""

    cls = controller_actor_class()
    actor = cls.options(name=name, namespace=NAMESPACE, lifetime="detached",
                        get_if_exists=True).remote(serving, settings, name, NAMESPACE)
    ray.get(actor.bootstrap.remote(), timeout=timeout_s)
    return actor


def get_controller(name: str = CONTROLLER_NAME) -> Any:

    return ray.get_actor(name, namespace=NAMESPACE)
