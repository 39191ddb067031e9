"""Has the live workload drifted from the one the current plan was made for? (issue #6, #16)

Re-planning costs adapter moves and replica restarts, so it must not fire on noise. Every
rate-based test therefore asks two questions: is the change large (a relative threshold), and is
it real (the observed count is further from the planned expectation than ``z`` Poisson standard
deviations, ``|observed - expected| > z * sqrt(expected + 1)``, counts over the window; see
``significant``)? Only changes that pass both drift. Per-adapter tests run once per adapter, so
their ``z`` is raised (``family_z``) to keep the chance of any false alarm per check that of a
single test. Checks, each adding one human-readable reason:

* newly registered adapters the plan does not place (always a re-plan: they have nowhere to go);
* the total rate;
* the hot set (the ``hot_k`` busiest adapters, which placement splits over replicas): adapters
  entering or leaving it count only if their own rate changed (large and significant), since
  near-equal adapters swap ranks on noise alone;
* each adapter's rate (adapters under ``min_rate_rps`` on both sides are ignored).

The rates are the *offered* load, counted at the ingress. What the engines report describes
service: a live throughput or TTFT off the twin's is a calibration gap (``calibration_notes``
reports it), never drift - more replicas do not make a slow engine fast. Missing capacity shows
as a queue that grows (``queue_growth``), which the controller treats as evidence on its own.

A step in the load inside the window would otherwise be averaged with the traffic before it, and
the estimate would creep towards the new rate for a whole window: the fleet would be sized for
half a doubling first. ``latest_change`` finds the last real step (a Poisson likelihood-ratio
change-point search over binned counts) so the estimate can rest on the traffic after it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from twin.workload import Workload

MAX_LISTED = 5  # ids listed in one reason before "+N more"
_NORMAL = NormalDist()
_GAP_LABELS = {"ttft": "TTFT mean", "throughput": "throughput"}


@dataclass(frozen=True)
class DriftConfig:
    """Thresholds of ``detect_drift`` (module notes); validated, errors name the field."""

    rel_rate_change: float = 0.25
    min_rate_rps: float = 0.05
    z: float = 4.0
    total_rate_change: float = 0.2
    hot_k: int = 5
    gap: float = 0.3  # a live figure this far off the twin's is reported as a calibration gap
    change_bin_s: float = 1.0  # bin width of the change-point search (telemetry comes ~1/s)
    change_min_s: float = 6.0  # evidence needed after a change point before it is used
    queue_growth: float = 16.0  # waiting requests a replica's queue must gain to count as growing
    saturated_min_s: float = 5.0  # seconds with a queue before a replica's finish rate is capacity
    stall_s: float = 5.0  # a busy host may hold arrivals back this long, then release them
    unsettled_share: float = 0.1  # share of a span's arrivals a stall may shift before it waits

    def __post_init__(self) -> None:
        for name in ("rel_rate_change", "z", "total_rate_change", "gap", "change_bin_s",
                     "change_min_s", "queue_growth", "saturated_min_s", "stall_s",
                     "unsettled_share"):
            value = getattr(self, name)
            if not _number(value) or value <= 0:
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        if not _number(self.min_rate_rps) or self.min_rate_rps < 0:
            raise ValueError(
                f"min_rate_rps: must be a finite number >= 0, got {self.min_rate_rps!r}"
            )
        if isinstance(self.hot_k, bool) or not isinstance(self.hot_k, int) or self.hot_k < 0:
            raise ValueError(f"hot_k: must be an integer >= 0 (0 disables), got {self.hot_k!r}")


@dataclass(frozen=True)
class Drift:
    """``drifted`` if any check fired; ``reasons`` one line each; ``details`` the numbers."""

    drifted: bool
    reasons: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def significant(observed: float, expected: float, z: float) -> bool:
    """Whether a count of ``observed`` is more than ``z`` Poisson sds from ``expected``.

    Two conditions: the plain count test ``|observed - expected| > z * sqrt(expected + 1)``
    (the +1 keeps a tiny expectation from making one request significant), and the same test on
    Anscombe's variance-stabilised scale (``2 sqrt(x + 3/8)`` has sd ~1), because at small counts
    the Poisson upper tail is much heavier than the normal one the plain test assumes."""
    observed, expected = max(observed, 0.0), max(expected, 0.0)
    plain = abs(observed - expected) > z * math.sqrt(expected + 1.0)
    stable = 2.0 * abs(math.sqrt(observed + 0.375) - math.sqrt(expected + 0.375)) > z
    return plain and stable


def family_z(z: float, n: int) -> float:
    """The per-test z for ``n`` simultaneous per-adapter tests that keeps the chance of any
    false alarm at that of one test at ``z`` (Bonferroni on the two-sided normal tail): with
    1,000 adapters, z = 4 per adapter would fire on noise in ~6 % of checks."""
    if n <= 1:
        return z
    tail = 2.0 * (1.0 - _NORMAL.cdf(z)) / n
    return max(z, _NORMAL.inv_cdf(1.0 - tail / 2.0))


def _ids(ids: Collection[str], sep: str = ",") -> str:
    ids = list(ids)
    head = sep.join(ids[:MAX_LISTED])
    return head + (f" +{len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")


def _hot(rates: Mapping[str, float], k: int) -> list[str]:
    return sorted(rates, key=lambda a: (-rates[a], a))[:k]


def detect_drift(
    planned: Workload,
    estimate: Workload,
    window_s: float,
    cfg: DriftConfig | None = None,
    *,
    registered_unplaced: Collection[str] = (),
) -> Drift:
    """Compare the estimate with the plan's workload (module notes).

    ``window_s``: seconds of traffic the estimate rests on (the judged span, or the part after
    a step in the load). ``registered_unplaced``: adapter ids registered but not in the plan.
    """
    cfg = cfg or DriftConfig()
    if not _number(window_s) or window_s <= 0:
        raise ValueError(f"window_s: must be > 0, got {window_s!r}")
    reasons: list[str] = []
    details: dict[str, Any] = {"window_s": float(window_s)}

    new = sorted(set(registered_unplaced))
    if new:
        reasons.append(f"new adapters registered: {_ids(new, ', ')}")
        details["new_adapters"] = new

    p_tot, e_tot = planned.total_rate_rps, estimate.total_rate_rps
    details["total_rate_rps"] = {"planned": p_tot, "estimated": e_tot}
    if significant(e_tot * window_s, p_tot * window_s, cfg.z):
        if p_tot <= 0:
            reasons.append(f"total rate {e_tot:.2f} req/s, the plan expected none")
        elif abs(e_tot / p_tot - 1.0) > cfg.total_rate_change:
            reasons.append(
                f"total rate {e_tot / p_tot:.2f}x the plan's ({e_tot:.1f} vs {p_tot:.1f} req/s)"
            )

    p_rates = {a.id: a.rate_rps for a in planned.adapters}
    e_rates = {a.id: a.rate_rps for a in estimate.adapters}
    ids = sorted(set(p_rates) | set(e_rates))

    z_each = family_z(cfg.z, len(ids))

    def changed(a: str) -> bool:
        p, e = p_rates.get(a, 0.0), e_rates.get(a, 0.0)
        return (max(p, e) >= cfg.min_rate_rps and abs(e - p) > cfg.rel_rate_change * p
                and significant(e * window_s, p * window_s, z_each))

    if 0 < cfg.hot_k < len(ids):
        hot_p = _hot({a: p_rates.get(a, 0.0) for a in ids}, cfg.hot_k)
        hot_e = _hot({a: e_rates.get(a, 0.0) for a in ids}, cfg.hot_k)
        # membership alone flips on noise between near-equal adapters: count only members
        # whose own rate changed for real
        came = [a for a in hot_e if a not in hot_p and changed(a)]
        left = [a for a in hot_p if a not in hot_e and changed(a)]
        details["hot_set"] = {"planned": hot_p, "estimated": hot_e, "in": came, "out": left}
        if came or left:
            reasons.append(f"hot set changed: {_ids(came) or '-'} in, {_ids(left) or '-'} out")

    moved: list[tuple[str, float, float]] = []
    for a in ids:
        if changed(a):
            moved.append((a, p_rates.get(a, 0.0), e_rates.get(a, 0.0)))
    details["adapter_rates"] = {a: {"planned": p, "estimated": e} for a, p, e in moved}
    moved.sort(key=lambda m: -abs(m[2] - m[1]))
    for a, p, e in moved[:MAX_LISTED]:
        reasons.append(f"adapter {a} rate {p:.2f} -> {e:.2f} req/s")
    if len(moved) > MAX_LISTED:
        reasons.append(f"... and {len(moved) - MAX_LISTED} more adapters changed rate")

    return Drift(drifted=bool(reasons), reasons=tuple(reasons), details=details)


def calibration_notes(gaps: Mapping[str, float] | None, cfg: DriftConfig | None = None
                      ) -> list[str]:
    """Live figures off the twin's by more than ``cfg.gap``: one line each, for ``status`` and
    the events, never a reason to re-plan (module notes). ``gaps``: ``"<replica> <metric>" ->
    live / predicted - 1`` (``replica_gaps``); ``ttft`` is reported only when live is worse."""
    cfg = cfg or DriftConfig()
    notes: list[str] = []
    for key, g in sorted((gaps or {}).items()):
        if not _number(g):
            continue
        replica, _, metric = key.rpartition(" ")
        replica = replica or key
        worse_only = metric == "ttft"
        if (g > cfg.gap) if worse_only else (abs(g) > cfg.gap):
            label = _GAP_LABELS.get(metric, metric or "figure")
            side = "above" if g > 0 else "below"
            notes.append(f"replica {replica}: live {label} {abs(g) * 100:.0f} % {side} the "
                         f"twin's (calibration gap)")
    return notes


def queue_growth(series: Sequence[tuple[float, int]], cfg: DriftConfig | None = None
                 ) -> float | None:
    """How many waiting requests a replica's queue gained over ``series`` (``(t, waiting)``,
    oldest first), when it grows: the least-squares slope x the span is at least
    ``cfg.queue_growth`` and so is the last value. None when it does not grow (a steady or
    draining queue, or fewer than three points). A backlog that drains after a transition has
    a falling slope; a replica that cannot keep up gains waiting requests at a steady rate."""
    cfg = cfg or DriftConfig()
    if len(series) < 3:
        return None
    ts = [t for t, _ in series]
    ws = [float(w) for _, w in series]
    n = len(ts)
    tm, wm = sum(ts) / n, sum(ws) / n
    var = sum((t - tm) ** 2 for t in ts)
    if var <= 0:
        return None
    slope = sum((t - tm) * (w - wm) for t, w in zip(ts, ws, strict=True)) / var
    gained = slope * (ts[-1] - ts[0])
    if gained >= cfg.queue_growth and ws[-1] >= cfg.queue_growth:
        return gained
    return None


def _split_llr(prefix: list[float], k: int) -> float:
    """Poisson log-likelihood ratio (x2) of "the rate steps after bin k" against one rate, for
    bins with prefix sums ``prefix`` (``prefix[i]`` = counts in the first i bins)."""
    n = len(prefix) - 1
    c1, c2 = prefix[k], prefix[n] - prefix[k]
    lam = (c1 + c2) / n
    if lam <= 0:
        return 0.0
    out = 0.0
    for c, t in ((c1, k), (c2, n - k)):
        if c > 0:
            out += c * math.log(c / (t * lam))
    return 2.0 * out


def _best_split(series: Mapping[str, list[float]], lo: int, hi: int, cfg: DriftConfig,
                min_left: int, min_right: int, total: str) -> int | None:
    """The most likely step inside bins [lo, hi) over all series, if one is real (z on the
    family of series x splits), large (the total's or an adapter's relative threshold) and
    lasting. A stall that delays arrivals and then releases them in a burst (a busy ingress, a
    transition) looks like a step for a few seconds but conserves the count: it moves at most
    ``stall_s`` seconds of traffic. So the traffic after a step must be ahead of (or behind)
    the rate before it by more than ``stall_s`` seconds of the lower of the two rates (a step
    ``d`` seconds old is ``d`` seconds ahead, up or down; plus ``z`` sds of Poisson noise),
    that rate taken before the last ``stall_s`` seconds ahead of the step (which a stall may
    have emptied), and the later half
    of the traffic after it must still differ from the traffic before it as much, in the same
    direction."""
    splits = range(lo + min_left, hi - min_right + 1)
    if not splits:
        return None
    z = family_z(cfg.z, len(series) * len(splits))
    stall_bins = cfg.stall_s / cfg.change_bin_s
    guard = math.ceil(stall_bins - 1e-9)
    best, where = z * z, None
    for key, counts in series.items():
        seg = counts[lo:hi]
        prefix = [0.0]
        for c in seg:
            prefix.append(prefix[-1] + c)
        rel = cfg.total_rate_change if key == total else cfg.rel_rate_change
        for k in splits:
            j = k - lo
            before, after = prefix[j] / j, (prefix[-1] - prefix[j]) / (len(seg) - j)
            if (max(before, after) < cfg.min_rate_rps * cfg.change_bin_s
                    or abs(after - before) <= rel * max(before, 1e-12)):
                continue
            g = j - guard if j - guard >= min_left else j  # a stall just before k held back
            steady = prefix[g] / g  # traffic that a release after k would add: the rate before it
            m = len(seg) - j
            moved = abs(after - steady) * m
            var = prefix[-1] - prefix[j] + m * m * steady / g + 1.0  # Poisson, both sides
            if moved <= stall_bins * min(steady, after) + cfg.z * math.sqrt(var):
                continue  # no more traffic moved than a stall (and noise) moves
            h = j + (len(seg) - j) // 2
            late = (prefix[-1] - prefix[h]) / (len(seg) - h)
            if (late - before) * (after - before) <= 0 or abs(late - before) <= rel * max(
                    before, 1e-12):
                continue
            llr = _split_llr(prefix, j)
            if llr > best:
                best, where = llr, k
    return where


def latest_change(bins: list[Mapping[str, float]], cfg: DriftConfig | None = None) -> int | None:
    """Index of the first bin after the last real step in the load, or None if it looks steady.

    ``bins``: arrivals per adapter in consecutive ``cfg.change_bin_s`` bins, oldest first
    (``WorkloadWindow.binned_counts``). The series searched are the total and the busiest
    ``hot_k`` adapters of the whole span and of its recent part (a hot set that moves changes
    those, not the total). Binary segmentation to the right: the most likely step, then the
    most likely step after it, until none is real; a step must leave ``change_min_s`` seconds
    after it, so the estimate that uses it rests on enough traffic."""
    cfg = cfg or DriftConfig()
    n = len(bins)
    min_right = max(1, math.ceil(cfg.change_min_s / cfg.change_bin_s - 1e-9))
    min_left = 2
    if n < min_left + min_right:
        return None
    total = "\0total"  # cannot clash with an adapter id (those are validated names)
    recent = bins[n - min_right:]
    whole: dict[str, float] = {}
    late: dict[str, float] = {}
    for part, acc in ((bins, whole), (recent, late)):
        for b in part:
            for a, c in b.items():
                acc[a] = acc.get(a, 0.0) + c
    ids = set(_hot(whole, cfg.hot_k)) | set(_hot(late, cfg.hot_k)) if cfg.hot_k else set()
    series = {total: [sum(b.values()) for b in bins]}
    for a in sorted(ids):
        series[a] = [b.get(a, 0.0) for b in bins]
    found, lo = None, 0
    while (k := _best_split(series, lo, n, cfg, min_left, min_right, total)) is not None:
        found, lo = k, k
    return found


def unsettled(bins: list[Mapping[str, float]], cfg: DriftConfig | None = None) -> str | None:
    """Why the total rate over ``bins`` (the span an estimate rests on, oldest first) is not
    one rate yet, or None. The cumulative arrivals of one rate follow a straight line; a busy
    host that stalls arrivals and releases them in a burst (the ingress, the load generator, a
    transition on two cores), a ramp or a step too young for ``latest_change`` bend it. The
    largest gap between the two, in arrivals, bounds how far the span's mean is off the rate
    now offered: when it exceeds what Poisson noise (``z`` sds of the bridge at that point) and
    a stall that shifts ``unsettled_share`` of the span's arrivals explain together (in
    quadrature), no decision should rest on the mean yet."""
    cfg = cfg or DriftConfig()
    n = len(bins)
    if n < 4:
        return None
    totals = [sum(b.values()) for b in bins]
    total = sum(totals)
    if total <= 0:
        return None
    run, gap, at = 0.0, 0.0, 0
    for k, c in enumerate(totals[:-1], start=1):
        run += c
        off = run - total * k / n
        if abs(off) > abs(gap):
            gap, at = off, k
    share = at / n
    noise = cfg.z * math.sqrt(total * share * (1.0 - share) + 1.0)
    if abs(gap) <= math.hypot(noise, cfg.unsettled_share * total):
        return None
    span = n * cfg.change_bin_s
    first, last = at * cfg.change_bin_s, span - at * cfg.change_bin_s
    rate = total / span
    shift = abs(gap) / rate
    return (f"the offered load is still moving: {rate:.1f} req/s over the last {span:.0f} s, "
            f"{(total * share + gap) / first:.1f} in its first {first:.0f} s and "
            f"{(total * (1 - share) - gap) / last:.1f} in its last (arrivals {shift:.1f} s "
            f"off a steady rate, over {cfg.unsettled_share:.0%} of the span)")


def replica_gaps(
    replica: str, live: Mapping[str, Any], predicted: Mapping[str, Any]
) -> dict[str, float]:
    """``calibration_notes``' ``gaps`` entries of one replica: ``live / predicted - 1`` for its
    throughput and TTFT. ``live`` is ``WorkloadWindow.live_metrics``; ``predicted`` a plan
    group's verified (or predicted) figures. The plan carries no TTFT mean, so a missing
    ``ttft_mean_ms`` falls back to ``ttft_p50_ms``. Figures missing or zero on either side are
    skipped (no gap can be told)."""
    out: dict[str, float] = {}
    pairs = (
        ("throughput", "total_throughput_tps", "total_throughput_tps"),
        ("ttft", "ttft_mean_ms",
         "ttft_mean_ms" if "ttft_mean_ms" in predicted else "ttft_p50_ms"),
    )
    for metric, live_key, pred_key in pairs:
        lv, pv = live.get(live_key), predicted.get(pred_key)
        if _number(lv) and _number(pv) and pv > 0:
            out[f"{replica} {metric}"] = float(lv) / float(pv) - 1.0
    return out
