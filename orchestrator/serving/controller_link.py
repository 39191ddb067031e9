"""How engine replicas and ingresses reach the controller of their deployment.

The serving corridor never imports the control corridor: a controller is a named Ray actor, and
these four calls are all the serving side ever makes of it. The controller implements them as
actor methods of the same names (``orchestrator.control.actor``):

* ``ingest(batch)``: an engine's telemetry batch (what it served, its queue, what it holds);
* ``ingest_offered(batch)``: an ingress's count of the client requests that arrived;
* ``routing_update(ingress, state)``: an ingress's poll (its drain state), answered with a newer
  routing table or None;
* ``role(endpoint)``: the role the controller has for an engine endpoint now (a replica Serve
  restarted comes back with its current adapters, not its first ones).

Every call has a timeout, and a failed call drops the cached actor handle, so the next one looks
the actor up again (a restarted controller); the caller decides what a failure means (a lost
telemetry batch, routing by the table it has, the role it was deployed with). The lookup is a
blocking GCS call: it runs in a thread, because an ingress serves clients on the same event
loop and a busy GCS (a transition deploying applications) must not hold their requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import ray

CALL_TIMEOUT_S = 5.0


class ControllerLink:
    """The controller named ``name`` in ``namespace``, looked up on first use."""

    def __init__(self, name: str, namespace: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.name, self.namespace, self.timeout_s = name, namespace, timeout_s
        self._actor: Any = None

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            if self._actor is None:
                self._actor = await asyncio.wait_for(asyncio.to_thread(
                    ray.get_actor, self.name, namespace=self.namespace), self.timeout_s)
            return await asyncio.wait_for(getattr(self._actor, method).remote(*args),
                                          self.timeout_s)
        except BaseException:
            self._actor = None
            raise

    async def push_served(self, batch: Mapping[str, Any]) -> None:
        await self._call("ingest", dict(batch))

    async def push_offered(self, batch: Mapping[str, Any]) -> None:
        await self._call("ingest_offered", dict(batch))

    async def routing_update(self, ingress: str, state: Mapping[str, Any]
                             ) -> dict[str, Any] | None:
        return await self._call("routing_update", ingress, dict(state))

    async def current_role(self, endpoint: str) -> Any:
        return await self._call("role", endpoint)
