"""The serving side's link to the controller never blocks the event loop its clients share."""

from __future__ import annotations

import asyncio
import threading

import pytest

from orchestrator.serving import controller_link
from orchestrator.serving.controller_link import ControllerLink


class _Actor:
    class _Method:
        async def _answer(self, *args):  # noqa: ANN002, ANN202
            return ("pong", args)

        def remote(self, *args):  # noqa: ANN002, ANN202
            return self._answer(*args)

    def __getattr__(self, name: str) -> _Method:
        return self._Method()


def test_actor_lookup_leaves_the_event_loop_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lookup is a blocking GCS call; while it waits (here: until a coroutine on the loop
    has run), the loop must keep serving, as an ingress's clients share it."""
    loop_ran = threading.Event()

    def get_actor(name: str, namespace: str) -> _Actor:
        assert (name, namespace) == ("ctl", "ns")
        if not loop_ran.wait(timeout=30):  # on the loop's own thread this never comes
            raise RuntimeError("the event loop was blocked during the lookup")
        return _Actor()

    monkeypatch.setattr(controller_link.ray, "get_actor", get_actor)

    async def main() -> tuple:
        async def client() -> None:
            await asyncio.sleep(0)
            loop_ran.set()

        return await asyncio.gather(ControllerLink("ctl", "ns").current_role("ep"), client())

    role, _ = asyncio.run(main())
    assert role == ("pong", ("ep",))


def test_a_failed_lookup_is_retried_on_the_next_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def get_actor(name: str, namespace: str) -> _Actor:
        calls.append(name)
        if len(calls) == 1:
            raise ValueError(f"Failed to look up actor with name '{name}'")
        return _Actor()

    monkeypatch.setattr(controller_link.ray, "get_actor", get_actor)
    link = ControllerLink("ctl", "ns")
    with pytest.raises(ValueError, match="ctl"):
        asyncio.run(link.push_offered({"n": 1}))
    assert asyncio.run(link.push_offered({"n": 1})) is None
    assert len(calls) == 2
