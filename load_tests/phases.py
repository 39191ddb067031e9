"""A load that changes in phases: open-loop Poisson traffic, one workload after another.

What the closed-loop tests and ``benchmarks/controller_shift.py`` drive a deployment with: each
phase is a ``twin.workload.Workload`` held for some seconds (its requests from
``generate_requests`` with the phase's own seed), sent at their arrival times whatever the
service does (open loop), each request's send time (wall clock, the controller's clock),
status and serving replica recorded. ``offered_rps`` answers "what did the client offer
between two instants", the truth a controller's estimate is judged against.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from load_tests.openloop import dispatch_open_loop
from twin.lengths import LengthModel
from twin.workload import AdapterSpec, Workload, generate_requests

DRAIN_TIMEOUT_S = 300.0  # after the last send, every request must have ended by then
UNTIL_POLL_S = 1.0  # how often a phase's end condition is asked


@dataclass(frozen=True)
class Phase:
    """One workload, offered for ``seconds``; with ``until``, for at least ``seconds`` and then
    until ``until()`` answers true (asked every second, in a thread: it may block) or
    ``max_s`` has passed. A test waits for what the system does, not for how fast a host is:
    on a slow machine the phase simply lasts longer."""

    workload: Workload
    seconds: float
    until: Callable[[], bool] | None = None
    max_s: float | None = None

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"Phase.seconds must be > 0, got {self.seconds}")
        if (self.until is None) != (self.max_s is None):
            raise ValueError("Phase.until and Phase.max_s go together (an end condition needs "
                             "a longest duration)")
        if self.max_s is not None and self.max_s < self.seconds:
            raise ValueError(f"Phase.max_s ({self.max_s}) is below Phase.seconds "
                             f"({self.seconds})")

    @property
    def longest_s(self) -> float:
        return self.seconds if self.max_s is None else self.max_s


def as_phase(p: Phase | tuple[Workload, float]) -> Phase:
    return p if isinstance(p, Phase) else Phase(p[0], p[1])


@dataclass
class PhaseRun:
    """What was sent: per request (wall-clock send time, status, replica or error name), and
    each phase's start (wall clock). Status -1: the client saw a transport error."""

    phase_starts: list[float]
    phase_ends: list[float]
    sent: list[tuple[float, int, str]] = field(default_factory=list)

    @property
    def statuses(self) -> Counter:
        return Counter(s for _, s, _ in self.sent)

    @property
    def failed(self) -> int:
        return sum(1 for _, s, _ in self.sent if s != 200)

    def offered_rps(self, start: float, end: float) -> float:
        """Requests the client sent in ``[start, end)`` per second."""
        if end <= start:
            return float("nan")
        return sum(1 for t, _, _ in self.sent if start <= t < end) / (end - start)

    def phase_of(self, t: float) -> int:
        """Index of the phase running at wall time ``t`` (-1 before the first)."""
        k = -1
        for i, s in enumerate(self.phase_starts):
            if t >= s:
                k = i
        return k


async def run_until(dispatch: asyncio.Task, phase: Phase, start: float) -> None:
    """Let ``dispatch`` send ``phase``'s requests until the phase is over (class notes)."""
    if phase.until is None:
        await dispatch
        return
    assert phase.max_s is not None
    await asyncio.sleep(max(0.0, start + phase.seconds - time.monotonic()))
    end = start + phase.max_s
    while time.monotonic() < end and not await asyncio.to_thread(phase.until):
        await asyncio.sleep(min(UNTIL_POLL_S, max(0.0, end - time.monotonic())))
    dispatch.cancel()
    await asyncio.gather(dispatch, return_exceptions=True)


async def drive_phases(url: str, phases: Sequence[Phase | tuple[Workload, float]], *,
                       seed: int = 0) -> PhaseRun:
    """Send every phase's requests open loop to ``url`` (module notes). Prompts are token ids
    as long as the workload's length model draws them, and ``ignore_eos`` holds each answer to
    its drawn output length. A phase with an end condition (``Phase.until``) ends when it
    holds; the next phase starts then."""
    # aiohttp, not httpx: httpcore's pool scans every pooled connection for each request
    # (is_idle / has_expired per connection), and with the hundreds of keep-alive connections an
    # open loop at 28 req/s builds, that scan took most of a core - on a 2-core host the client
    # then held requests for 10 s and released them in bursts, which the controller rightly
    # counted as what arrived (benchmarks/controller_shift.py, docs/controller.md)
    connector = aiohttp.TCPConnector(limit=3000, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=DRAIN_TIMEOUT_S)
    tasks: list[asyncio.Task] = []
    run = PhaseRun([], [])
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=timeout) as client:
        t0 = time.monotonic()
        wall0 = time.time() - t0  # wall clock = wall0 + monotonic
        offset = 0.0
        for k, phase in enumerate(map(as_phase, phases)):
            w = phase.workload
            batch = generate_requests(w, duration_s=phase.longest_s, seed=seed + k)
            ids = [w.adapters[i].id for i in batch.adapter]
            prompts, outs = batch.prompt_len, batch.output_len

            async def one(i: int, ids: list[str] = ids, prompts: np.ndarray = prompts,
                          outs: np.ndarray = outs) -> None:
                sent = wall0 + time.monotonic()
                try:
                    async with client.post("/v1/completions", json={
                            "model": ids[i], "prompt": [7] * int(prompts[i]),
                            "max_tokens": int(outs[i]), "ignore_eos": True}) as r:
                        await r.read()
                        run.sent.append((sent, r.status,
                                         r.headers.get("x-lorafleet-replica", "")))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    run.sent.append((sent, -1, type(exc).__name__))

            run.phase_starts.append(wall0 + t0 + offset)
            dispatch = asyncio.create_task(dispatch_open_loop(
                np.asarray(batch.arrival_s) + offset, t0, time.monotonic, one, tasks))
            await run_until(dispatch, phase, t0 + offset)
            # a phase that ended on its condition ends now; a timed one at its planned end
            # (its last request may be sent before it)
            offset = (time.monotonic() - t0 if phase.until is not None
                      else offset + phase.seconds)
            run.phase_ends.append(wall0 + t0 + offset)
        await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_TIMEOUT_S)
    run.sent.sort()
    return run


# ---------------------------------------------------------------------------------------------
# the shift scenario of the closed-loop test and benchmark
# ---------------------------------------------------------------------------------------------

SHIFT_IDS = tuple(f"a{i:02d}" for i in range(16))
SHIFT_LENGTHS = LengthModel(kind="fixed", prompt=256, output=128)
SHIFT_RATE = 14.0  # req/s: two tiny-CPU replicas (one holds ~11); twice this needs three
SHIFT_START_HOT = ("a00", "a01")


def hot_workload(hot: Sequence[str], total_rps: float, share: float = 0.7) -> Workload:
    """The 16 shift adapters: ``share`` of ``total_rps`` split over ``hot``, the rest even."""
    rest = [a for a in SHIFT_IDS if a not in hot]
    return Workload("shift", tuple(
        AdapterSpec(a, 8, total_rps * share / len(hot) if a in hot
                    else total_rps * (1 - share) / len(rest)) for a in SHIFT_IDS),
        SHIFT_LENGTHS)


def shift_phases(moved_hot: Sequence[str], phase_s: float, rate: float = SHIFT_RATE
                 ) -> list[tuple[Workload, float]]:
    """As planned -> the hot set moves to ``moved_hot`` -> the total rate doubles -> it halves
    (the two last phases 1.5x as long: they need a transition each)."""
    return [(hot_workload(SHIFT_START_HOT, rate), phase_s),
            (hot_workload(moved_hot, rate), phase_s),
            (hot_workload(moved_hot, 2 * rate), 1.5 * phase_s),
            (hot_workload(moved_hot, rate), 1.5 * phase_s)]
