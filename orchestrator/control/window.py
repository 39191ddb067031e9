"""The live workload, estimated from what the engine replicas report (closed loop, issue #6).

Every engine replica pushes a ``TelemetryBatch`` about once a second: per-adapter counts over
``[t_start, t_end)``. ``WorkloadWindow`` keeps the batches of the last ``window_s`` seconds and
turns them into the two things the controller needs:

* ``coverage``: whether every replica of the fleet reported for (almost) the whole window. Lost
  telemetry would read as a rate drop, so an incomplete window means "do not re-plan";
* ``estimate``: a ``twin.workload.Workload`` with the observed per-adapter Poisson rates and, once
  enough requests finished, the observed mean prompt/output lengths, ready for the planner.

A batch straddling the window start counts in proportion to its overlap (counts are assumed
uniform within a batch), and each replica's counts are divided by the time *that* replica
covered, so a missed push shrinks the evidence instead of biasing the rate.

Pure Python: the Ray controller actor feeds it; tests drive it with synthetic batches.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from twin.lengths import LengthModel, WorkloadError
from twin.workload import AdapterSpec, Workload

DEFAULT_WINDOW_S = 60.0
DEFAULT_STALE_AFTER_S = 3.0
DEFAULT_MIN_COVERAGE = 0.8
DEFAULT_MIN_SPAN_S = 10.0
MIN_FINISHED_FOR_LENGTHS = 50  # finished requests before observed means replace the length model
ESTIMATE_DURATION_S = 3600.0
BASE_MODEL = ""  # the adapter id of base-model requests

_COUNT_MAPS = ("arrivals", "finished", "prompt_tokens", "output_tokens")
_INTS = ("failed", "running", "waiting")
_OPTIONAL = ("adapters_held", "instance")


# ---------------------------------------------------------------------------------------------
# what a replica pushes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TelemetryBatch:
    """What one engine replica pushes every ~1 s: counts over [t_start, t_end) (wall clock,
    ``time.time()``). Validated on construction; errors (``ValueError``) name the field."""

    replica: str  # endpoint name of the engine replica
    t_start: float
    t_end: float
    arrivals: Mapping[str, int]  # adapter id ("" = base model) -> requests arrived
    finished: Mapping[str, int]  # adapter id -> requests that finished OK
    prompt_tokens: Mapping[str, int]  # adapter id -> summed prompt tokens of those finished
    output_tokens: Mapping[str, int]  # adapter id -> summed output tokens of those finished
    ttft_ms_sum: float  # over finished requests
    latency_ms_sum: float  # arrival -> finish, over finished requests
    failed: int  # requests that ended with an error in the interval
    running: int  # queue depth at t_end
    waiting: int
    adapters_held: tuple[str, ...] = ()  # adapters the engine currently has loaded
    instance: str = ""  # the replica process (a new one: Serve replaced the replica)

    def __post_init__(self) -> None:
        if not isinstance(self.replica, str) or not self.replica:
            raise ValueError(f"replica: must be a non-empty string, got {self.replica!r}")
        for name in ("t_start", "t_end", "ttft_ms_sum", "latency_ms_sum"):
            object.__setattr__(self, name, _finite(getattr(self, name), name))
        if self.t_end < self.t_start:
            raise ValueError(f"t_end: must be >= t_start ({self.t_start}), got {self.t_end}")
        for name in ("ttft_ms_sum", "latency_ms_sum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in _COUNT_MAPS:
            object.__setattr__(self, name, _count_map(getattr(self, name), name))
        for name in _INTS:
            object.__setattr__(self, name, _count(getattr(self, name), name))
        held = self.adapters_held
        if isinstance(held, str) or not isinstance(held, Collection):
            raise ValueError(f"adapters_held: must be a list of adapter ids, got {held!r}")
        held = tuple(held)
        for i, a in enumerate(held):
            if not isinstance(a, str):
                raise ValueError(f"adapters_held[{i}]: must be a string, got {a!r}")
        object.__setattr__(self, "adapters_held", held)
        if not isinstance(self.instance, str):
            raise ValueError(f"instance: must be a string, got {self.instance!r}")

    @property
    def duration_s(self) -> float:
        return self.t_end - self.t_start

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what travels from the replica to the controller)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _COUNT_MAPS:
                value = dict(value)
            elif f.name == "adapters_held":
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Any) -> TelemetryBatch:
        """Validate a pushed dict: unknown or missing keys and bad values name the field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"telemetry batch: must be a mapping, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field; expected {names}")
        missing = [n for n in names if n not in d and n not in _OPTIONAL]
        if missing:
            raise ValueError(f"{missing[0]}: required")
        return cls(**{n: d[n] for n in names if n in d})


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number, got {value!r}")
    return float(value)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: must be a non-negative integer, got {value!r}")
    return int(value)


def _count_map(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: must be a mapping adapter id -> count, got {value!r}")
    out: dict[str, int] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ValueError(f"{where}: adapter ids must be strings, got {k!r}")
        out[k] = _count(v, f"{where}.{k or '<base>'}")
    return out


# ---------------------------------------------------------------------------------------------
# coverage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    """How well the expected replicas' telemetry covers the judged span ``[now - span_s, now]``.

    ``fraction[r]``: share of the span covered by replica r's batches; ``age_s[r]``: seconds since
    its last batch ended (``inf`` if never seen). ``why`` says what is missing when incomplete.
    """

    complete: bool
    span_s: float
    fraction: Mapping[str, float] = field(default_factory=dict)
    age_s: Mapping[str, float] = field(default_factory=dict)
    why: str = ""


# ---------------------------------------------------------------------------------------------
# the window
# ---------------------------------------------------------------------------------------------


class WorkloadWindow:
    """Sliding window of the replicas' telemetry batches.

    ``since`` (on every query): the moment the current deployment started; the judged span is
    ``[max(now - window_s, since), now]``, so a freshly re-planned fleet is judged only on traffic
    it served. ``min_span_s``: a shorter span is incomplete (too little evidence to act on).
    """

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        *,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
        min_span_s: float = DEFAULT_MIN_SPAN_S,
    ) -> None:
        for name, value in (("window_s", window_s), ("stale_after_s", stale_after_s)):
            if _finite(value, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {value}")
        if not 0.0 < _finite(min_coverage, "min_coverage") <= 1.0:
            raise ValueError(f"min_coverage: must be within (0, 1], got {min_coverage}")
        if not 0.0 <= _finite(min_span_s, "min_span_s") <= window_s:
            raise ValueError(f"min_span_s: must be within [0, window_s], got {min_span_s}")
        self.window_s = float(window_s)
        self.stale_after_s = float(stale_after_s)
        self.min_coverage = float(min_coverage)
        self.min_span_s = float(min_span_s)
        self._batches: dict[str, deque[TelemetryBatch]] = {}

    # -- input ------------------------------------------------------------------------------

    def add(self, batch: TelemetryBatch) -> None:
        """Store one batch (an exact re-send of an interval is ignored); drop expired ones."""
        if not isinstance(batch, TelemetryBatch):
            raise TypeError(f"batch: must be a TelemetryBatch, got {type(batch).__name__}")
        q = self._batches.setdefault(batch.replica, deque())
        if any(b.t_start == batch.t_start and b.t_end == batch.t_end for b in reversed(q)):
            return
        if q and batch.t_end < q[-1].t_end:  # out of order: rare, keep the deque sorted
            q.append(batch)
            ordered = sorted(q, key=lambda b: b.t_end)
            q.clear()
            q.extend(ordered)
        else:
            q.append(batch)
        _prune(q, max(batch.t_end, q[-1].t_end) - self.window_s)

    def forget(self, replica: str) -> None:
        """Drop a replica that left the fleet (its old batches must not count any more)."""
        self._batches.pop(replica, None)

    def latest(self, replica: str) -> TelemetryBatch | None:
        """The replica's newest batch (what it holds right now), if any is in the window."""
        q = self._batches.get(replica)
        return q[-1] if q else None

    @property
    def replicas(self) -> tuple[str, ...]:
        """Replicas with batches currently held."""
        return tuple(r for r, q in self._batches.items() if q)

    # -- queries ----------------------------------------------------------------------------

    def span(self, now: float, since: float | None = None) -> tuple[float, float]:
        """The judged interval ``(start, now)``."""
        start = now - self.window_s
        if since is not None:
            start = max(start, float(since))
        return min(start, now), now

    def coverage(
        self, now: float, replicas: Collection[str], *, since: float | None = None
    ) -> Coverage:
        """Complete only if every expected replica reported within ``stale_after_s`` and its
        batches cover at least ``min_coverage`` of the judged span (see the class notes)."""
        self._prune_all(now)
        start, end = self.span(now, since)
        length = end - start
        fraction: dict[str, float] = {}
        age: dict[str, float] = {}
        problems: list[str] = []
        for r in sorted(set(replicas)):
            q = self._batches.get(r)
            if not q:
                fraction[r], age[r] = 0.0, math.inf
                problems.append(f"replica {r} has not reported")
                continue
            age[r] = max(0.0, now - q[-1].t_end)
            covered = sum(b.duration_s * w for b, w in _weighted(q, start, end))
            fraction[r] = min(1.0, covered / length) if length > 0 else 0.0
            if age[r] > self.stale_after_s:
                problems.append(f"replica {r} last reported {age[r]:.1f} s ago")
            elif fraction[r] < self.min_coverage:
                problems.append(
                    f"replica {r} covers {fraction[r] * 100:.0f} % of the last {length:.0f} s "
                    f"(need {self.min_coverage * 100:.0f} %)"
                )
        if not fraction:
            problems.insert(0, "no replicas to judge")
        if length < self.min_span_s:
            problems.insert(
                0, f"only {length:.1f} s since the plan started (need {self.min_span_s:.0f} s)"
            )
        return Coverage(
            complete=not problems, span_s=length, fraction=fraction, age_s=age,
            why="; ".join(problems),
        )

    def counts(self, now: float, *, since: float | None = None) -> dict[str, float]:
        """Arrivals per adapter id over the judged span, each replica scaled to the full span
        (its count / its covered seconds x span seconds), summed over replicas."""
        start, end = self.span(now, since)
        rates = self._rates(start, end)
        return {a: r * (end - start) for a, r in rates.items()}

    def unknown_ids(
        self, now: float, ranks: Mapping[str, int], *, since: float | None = None
    ) -> dict[str, float]:
        """Adapter ids that received traffic but are not registered (``estimate`` ignores
        them): id -> arrivals in the judged span. The base model ("") is not listed."""
        return {
            a: n for a, n in sorted(self.counts(now, since=since).items())
            if a != BASE_MODEL and a not in ranks and n > 0
        }

    def estimate(
        self,
        now: float,
        *,
        ranks: Mapping[str, int],
        lengths: LengthModel,
        name: str = "live",
        since: float | None = None,
    ) -> Workload:
        """The observed workload: every registered adapter (``ranks``: id -> rank, in this
        order) with its observed Poisson rate (0 if silent: it stays placed), base-model traffic
        as ``base_model_rate_rps``, and ``lengths`` rescaled to the observed means once
        ``MIN_FINISHED_FOR_LENGTHS`` requests finished. ValueError if there is no telemetry."""
        self._prune_all(now)
        start, end = self.span(now, since)
        covered = self._covered(start, end)
        if not covered:
            raise ValueError(
                f"no telemetry in the last {end - start:.1f} s; cannot estimate the workload"
            )
        rates = self._rates(start, end, covered)
        adapters = tuple(
            AdapterSpec(id=a, rank=int(rank), rate_rps=round(rates.get(a, 0.0), 9))
            for a, rank in ranks.items()
        )
        finished = prompt = output = 0.0
        for b, w in self._in_span(start, end):
            finished += w * sum(b.finished.values())
            prompt += w * sum(b.prompt_tokens.values())
            output += w * sum(b.output_tokens.values())
        if finished >= MIN_FINISHED_FOR_LENGTHS:
            lengths = rescale_lengths(lengths, prompt / finished, output / finished)
        return Workload(
            name=name,
            adapters=adapters,
            lengths=lengths,
            duration_s=ESTIMATE_DURATION_S,
            base_model_rate_rps=round(rates.get(BASE_MODEL, 0.0), 9),
        )

    def binned_counts(
        self, now: float, *, bin_s: float = 1.0, since: float | None = None
    ) -> list[dict[str, float]]:
        """Arrivals per adapter in consecutive ``bin_s`` bins ending at ``now``, oldest first
        (whole bins of the judged span only) - up to ``reported_until(now)``, not ``now``: the
        seconds some replica has not pushed yet would read as a drop (and a push that comes late
        as a burst), a step that never happened. As in ``estimate``, each replica's count in a
        bin is scaled to the whole bin by the part of it that replica's batches cover, so a lost
        push does not read as a dip. What ``drift.latest_change`` searches for a change point."""
        if _finite(bin_s, "bin_s") <= 0:
            raise ValueError(f"bin_s: must be > 0, got {bin_s}")
        self._prune_all(now)
        start, _ = self.span(now, since)
        end = self.bins_end(now, since)
        n = int((end - start) / bin_s + 1e-9)
        if n <= 0:
            return []
        start = end - n * bin_s
        bins: list[dict[str, float]] = [{} for _ in range(n)]
        for q in self._batches.values():
            counts: list[dict[str, float]] = [{} for _ in range(n)]
            covered = [0.0] * n
            for b, _ in _weighted(q, start, end):
                first = max(0, int((b.t_start - start) / bin_s))
                for i in range(first, min(n, int((b.t_end - start) / bin_s) + 1)):
                    lo, hi = start + i * bin_s, start + (i + 1) * bin_s
                    for part, w in _weighted((b,), lo, hi):
                        covered[i] += part.duration_s * w
                        for a, k in part.arrivals.items():
                            counts[i][a] = counts[i].get(a, 0.0) + w * k
            for i in range(n):
                if covered[i] > 0:
                    scale = bin_s / covered[i]
                    for a, k in counts[i].items():
                        bins[i][a] = bins[i].get(a, 0.0) + k * scale
        return bins

    def reported_until(self, now: float) -> float:
        """The time up to which every replica still reporting has reported (the earliest of
        their latest batch ends), at most ``now``. A replica silent for over ``stale_after_s``
        is gone or lost (``coverage`` says so) and does not hold the bins back."""
        ends = [max(b.t_end for b in q) for q in self._batches.values() if q]
        return min([now, *(e for e in ends if now - e <= self.stale_after_s)])

    def bins_end(self, now: float, since: float | None = None) -> float:
        """Where ``binned_counts(now, since=since)`` ends: ``reported_until(now)``, not before
        the judged span starts."""
        return max(self.span(now, since)[0], self.reported_until(now))

    def live_metrics(
        self, now: float, replica: str, *, since: float | None = None
    ) -> dict[str, Any]:
        """One replica's live figures over the judged span, to compare with the plan's
        prediction (rates and throughput per covered second; queue state from the last batch)."""
        self._prune_all(now)
        start, end = self.span(now, since)
        q = self._batches.get(replica) or deque()
        covered = arrivals = finished = tokens = out = ttft = latency = failed = 0.0
        for b, w in _weighted(q, start, end):
            covered += b.duration_s * w
            arrivals += w * sum(b.arrivals.values())
            finished += w * sum(b.finished.values())
            out += w * sum(b.output_tokens.values())
            tokens += w * (sum(b.prompt_tokens.values()) + sum(b.output_tokens.values()))
            ttft += w * b.ttft_ms_sum
            latency += w * b.latency_ms_sum
            failed += w * b.failed
        last = q[-1] if q else None
        return {
            "covered_s": covered,
            "request_rate_rps": arrivals / covered if covered > 0 else math.nan,
            "total_throughput_tps": tokens / covered if covered > 0 else math.nan,
            "ttft_mean_ms": ttft / finished if finished > 0 else math.nan,
            "latency_mean_ms": latency / finished if finished > 0 else math.nan,
            # decode time per decoded token, the twin's ITL mean
            "itl_mean_ms": (latency - ttft) / (out - finished) if out > finished else math.nan,
            "finished": round(finished),
            "failed": round(failed),
            "running": last.running if last else 0,
            "waiting": last.waiting if last else 0,
            "adapters_held": last.adapters_held if last else (),
        }

    def live_metrics_total(self, now: float, *, since: float | None = None) -> dict[str, Any]:
        """``live_metrics`` of every source together (the ingress replicas: the fleet as its
        clients see it): TTFT and ITL means weighted by finished requests, failures summed."""
        parts = [self.live_metrics(now, r, since=since) for r in self.replicas]
        done = sum(p["finished"] for p in parts)
        out: dict[str, Any] = {"finished": done, "failed": sum(p["failed"] for p in parts),
                               "waiting": 0}
        for key in ("ttft_mean_ms", "itl_mean_ms"):
            got = [(p["finished"], p[key]) for p in parts if math.isfinite(p[key])]
            n = sum(w for w, _ in got)
            out[key] = sum(w * v for w, v in got) / n if n else math.nan
        return out

    def queue_series(
        self, now: float, replica: str, *, since: float | None = None
    ) -> list[tuple[float, int]]:
        """``(t_end, waiting)`` of one replica's batches ending inside the judged span, oldest
        first: the queue's trajectory, which ``drift.queue_growth`` reads as evidence of missing
        capacity (a growing queue) where a live figure below the twin's is not."""
        self._prune_all(now)
        start, end = self.span(now, since)
        q = self._batches.get(replica) or ()
        return [(b.t_end, b.waiting) for b in q if start < b.t_end <= end]

    def saturated_rate(
        self, now: float, replica: str, *, since: float | None = None
    ) -> tuple[float, float]:
        """``(requests/s finished, seconds)`` over one replica's batches inside the judged span
        during which it had waiting requests throughout (the batch before and the batch itself
        end with a queue): what the replica serves when work is never short, i.e. its measured
        capacity. A replica that merely took a burst finishes at that rate too; one that cannot
        keep up finishes below what the twin promised."""
        self._prune_all(now)
        start, end = self.span(now, since)
        q = list(self._batches.get(replica) or ())
        finished = seconds = 0.0
        for prev, b in zip(q, q[1:], strict=False):
            if b.t_start < start or b.t_end > end or prev.waiting <= 0 or b.waiting <= 0:
                continue
            finished += sum(b.finished.values())
            seconds += b.duration_s
        return (finished / seconds if seconds > 0 else 0.0), seconds

    # -- internals --------------------------------------------------------------------------

    def _prune_all(self, now: float) -> None:
        for q in self._batches.values():
            _prune(q, now - self.window_s)

    def _in_span(self, start: float, end: float) -> Iterator[tuple[TelemetryBatch, float]]:
        for q in self._batches.values():
            yield from _weighted(q, start, end)

    def _covered(self, start: float, end: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for r, q in self._batches.items():
            covered = sum(b.duration_s * w for b, w in _weighted(q, start, end))
            if covered > 0:
                out[r] = covered
        return out

    def _rates(
        self, start: float, end: float, covered: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Per adapter: sum over replicas of (weighted arrivals / that replica's covered s)."""
        covered = self._covered(start, end) if covered is None else covered
        rates: dict[str, float] = {}
        for r, seconds in covered.items():
            for b, w in _weighted(self._batches[r], start, end):
                for a, n in b.arrivals.items():
                    rates[a] = rates.get(a, 0.0) + w * n / seconds
        return rates


def _prune(q: deque[TelemetryBatch], cutoff: float) -> None:
    while q and q[0].t_end <= cutoff:
        q.popleft()


def _weighted(
    q: Collection[TelemetryBatch], start: float, end: float
) -> Iterator[tuple[TelemetryBatch, float]]:
    """Batches overlapping ``[start, end]`` with the fraction of each inside it (counts are
    taken as uniform over a batch; a zero-length batch inside counts whole)."""
    for b in q:
        d = b.duration_s
        if d == 0:
            if start <= b.t_start <= end:
                yield b, 1.0
            continue
        overlap = min(b.t_end, end) - max(b.t_start, start)
        if overlap > 0:
            yield b, overlap / d


def rescale_lengths(lengths: LengthModel, prompt_mean: float, output_mean: float) -> LengthModel:
    """``lengths`` moved to the observed mean prompt/output tokens.

    fixed: the rounded means; normal/lognormal: mean and std scaled by the same factor (the
    shape is kept; the factor is taken against the model's effective, bound-clamped mean);
    sharegpt: its ``prompt_mean``/``output_mean``; empirical: unchanged (it is data already).
    A target the model cannot reach (sharegpt filters) keeps the given model.
    """
    prompt_mean, output_mean = max(1.0, prompt_mean), max(1.0, output_mean)
    try:
        if lengths.kind == "fixed":
            return replace(lengths, prompt=round(prompt_mean), output=round(output_mean))
        if lengths.kind in ("normal", "lognormal"):
            fp = prompt_mean / lengths.mean_prompt()
            fo = output_mean / lengths.mean_output()
            assert lengths.prompt_mean is not None and lengths.output_mean is not None
            return replace(
                lengths,
                prompt_mean=round(lengths.prompt_mean * fp, 3),
                prompt_std=round((lengths.prompt_std or 0.0) * fp, 3),
                output_mean=round(lengths.output_mean * fo, 3),
                output_std=round((lengths.output_std or 0.0) * fo, 3),
            )
        if lengths.kind == "sharegpt":
            model = replace(
                lengths, prompt_mean=round(prompt_mean, 3), output_mean=round(output_mean, 3)
            )
            model.mean_prompt()  # unreachable targets fail here, not later in the planner
            return model
    except WorkloadError:
        return lengths
    return lengths
