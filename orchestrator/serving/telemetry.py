"""Per-request telemetry of one replica, summarised over a sliding window.

Each finished request leaves one record (adapter, arrival, TTFT, finish, tokens). ``snapshot``
turns the records of the last ``window_s`` seconds into the figures the twin predicts, with the
twin's definitions (twin/metrics.py): throughput counts completed requests' prompt + generated
tokens per second; TTFT over completed requests; ITL mean = decode time / decode tokens;
per-adapter arrival rates count every request that arrived (completed or not). Pure Python, so
``lorafleet status`` and tests read the same numbers the replica computes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_WINDOW_S = 60.0
MAX_RECORDS = 100_000


@dataclass(frozen=True)
class RequestRecord:
    adapter: str  # "" for the base model
    arrival: float  # clock seconds
    first_token: float  # NaN if none
    finish: float  # NaN if not finished normally
    prompt_tokens: int
    output_tokens: int
    ok: bool


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Telemetry:
    """Bounded record buffer + live counters; ``snapshot`` summarises a window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 window_s: float = DEFAULT_WINDOW_S) -> None:
        self.clock = clock
        self.window_s = window_s
        self.started = clock()
        self.records: deque[RequestRecord] = deque(maxlen=MAX_RECORDS)
        self.arrivals: deque[tuple[float, str]] = deque(maxlen=MAX_RECORDS)
        self.total_requests = 0
        self.total_errors = 0
        self.in_flight = 0
        self._batch = _Batch(time.time())

    def take_batch(self) -> dict[str, Any]:
        """Counts since the previous call, as the controller ingests them
        (``orchestrator.control.window.TelemetryBatch`` fields, minus the replica's own)."""
        batch, self._batch = self._batch, _Batch(time.time())
        return batch.to_dict(self._batch.t_start)

    def arrived(self, adapter: str) -> float:
        now = self.clock()
        self.arrivals.append((now, adapter))
        self.total_requests += 1
        self.in_flight += 1
        b = self._batch
        b.arrivals[adapter] = b.arrivals.get(adapter, 0) + 1
        return now

    def finished(self, rec: RequestRecord) -> None:
        self.in_flight -= 1
        self.records.append(rec)
        b = self._batch
        if not rec.ok:
            self.total_errors += 1
            b.failed += 1
            return
        a = rec.adapter
        b.finished[a] = b.finished.get(a, 0) + 1
        b.prompt_tokens[a] = b.prompt_tokens.get(a, 0) + rec.prompt_tokens
        b.output_tokens[a] = b.output_tokens.get(a, 0) + rec.output_tokens
        if math.isfinite(rec.first_token):
            b.ttft_ms_sum += (rec.first_token - rec.arrival) * 1e3
        b.latency_ms_sum += (rec.finish - rec.arrival) * 1e3

    def snapshot(self, window_s: float | None = None) -> dict[str, Any]:
        """Figures over the last ``window_s`` seconds (or since start if shorter)."""
        now = self.clock()
        window = window_s or self.window_s
        span = max(1e-9, min(window, now - self.started))
        t0 = now - span
        recent = [r for r in self.records if r.finish >= t0 and r.ok]
        per: dict[str, dict[str, Any]] = {}
        for t, a in self.arrivals:
            if t >= t0:
                per.setdefault(a, _empty())["arrived"] += 1
        for r in recent:
            p = per.setdefault(r.adapter, _empty())
            p["completed"] += 1
            p["tokens"] += r.prompt_tokens + r.output_tokens
            p["ttft_ms"].append((r.first_token - r.arrival) * 1e3)
        adapters = {
            a or "<base>": {
                "rate_rps": p["arrived"] / span,
                "completed_rps": p["completed"] / span,
                "throughput_tps": p["tokens"] / span,
                "ttft_p50_ms": _quantile(p["ttft_ms"], 0.5),
            }
            for a, p in sorted(per.items())
        }
        ttft = [(r.first_token - r.arrival) * 1e3 for r in recent]
        decode_ms = sum((r.finish - r.first_token) * 1e3 for r in recent if r.output_tokens > 1)
        decode_tok = sum(r.output_tokens - 1 for r in recent if r.output_tokens > 1)
        tokens = sum(r.prompt_tokens + r.output_tokens for r in recent)
        return {
            "window_s": span,
            "uptime_s": now - self.started,
            "total_requests": self.total_requests,
            "total_errors": self.total_errors,
            "in_flight": self.in_flight,
            "completed": len(recent),
            "request_rate_rps": sum(1 for t, _ in self.arrivals if t >= t0) / span,
            "total_throughput_tps": tokens / span,
            "ttft_p50_ms": _quantile(ttft, 0.5),
            "ttft_p99_ms": _quantile(ttft, 0.99),
            "itl_mean_ms": decode_ms / decode_tok if decode_tok else math.nan,
            "adapters": adapters,
        }


@dataclass
class _Batch:
    """Counters of one push interval (wall clock start: the controller aligns replicas)."""

    t_start: float
    arrivals: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    output_tokens: dict[str, int] = field(default_factory=dict)
    ttft_ms_sum: float = 0.0
    latency_ms_sum: float = 0.0
    failed: int = 0

    def to_dict(self, t_end: float) -> dict[str, Any]:
        return {"t_start": self.t_start, "t_end": t_end, "arrivals": self.arrivals,
                "finished": self.finished, "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "ttft_ms_sum": self.ttft_ms_sum,
                "latency_ms_sum": self.latency_ms_sum, "failed": self.failed}


def _empty() -> dict[str, Any]:
    return {"arrived": 0, "completed": 0, "tokens": 0, "ttft_ms": []}
