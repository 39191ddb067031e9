"""The phased open-loop client (load_tests/phases.py) against a real local HTTP server: timed
phases last their seconds, a phase with an end condition lasts until it holds (and at least its
seconds), and the next phase starts then."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from aiohttp import web

from load_tests.phases import Phase, drive_phases, hot_workload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    """An aiohttp server answering every completion with 200 and a replica header."""
    port = free_port()
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def completion(request: web.Request) -> web.Response:
        await request.json()
        return web.json_response({"ok": True}, headers={"x-lorafleet-replica": "r0"})

    async def main() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/completions", completion)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        return runner

    runner = loop.run_until_complete(main())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def test_a_phase_with_an_end_condition_lasts_until_it_holds(server) -> None:
    w = hot_workload(("a00",), 20.0)
    t_flip = time.monotonic() + 2.5  # the condition turns true 2.5 s in (1 s timed + 1.5 s)
    asked = []

    def until() -> bool:
        asked.append(time.monotonic())
        return time.monotonic() >= t_flip

    run = asyncio.run(drive_phases(server, [(w, 1.0), Phase(w, 0.5, until=until, max_s=60.0),
                                            (w, 1.0)]))
    first, second, third = zip(run.phase_starts, run.phase_ends, strict=True)
    assert first[1] - first[0] == pytest.approx(1.0)
    assert 1.5 <= second[1] - second[0] < 10.0  # ended on the condition, not at max_s
    assert third[0] == pytest.approx(second[1])  # the next phase starts when it ended
    assert len(asked) >= 2  # asked until it held
    assert run.statuses.keys() == {200} and run.failed == 0
    # each phase offered its rate (20 req/s; loose: Poisson over a few seconds)
    for start, end in (first, second, third):
        assert 5.0 < run.offered_rps(start, end) < 45.0
    assert not [t for t, _, _ in run.sent if t > third[1] + 0.5]  # nothing after the last


def test_a_phase_whose_condition_never_holds_ends_at_its_longest(server) -> None:
    w = hot_workload(("a00",), 10.0)
    run = asyncio.run(drive_phases(server, [Phase(w, 0.5, until=lambda: False, max_s=2.0)]))
    assert run.phase_ends[0] - run.phase_starts[0] == pytest.approx(2.0, abs=0.5)
    assert run.failed == 0


def test_phase_validation_names_the_field() -> None:
    w = hot_workload(("a00",), 1.0)
    with pytest.raises(ValueError, match="Phase.seconds"):
        Phase(w, 0.0)
    with pytest.raises(ValueError, match="until and Phase.max_s"):
        Phase(w, 1.0, until=lambda: True)
    with pytest.raises(ValueError, match="Phase.max_s"):
        Phase(w, 5.0, until=lambda: True, max_s=1.0)
