"""What the serving path adds to the engine's latency, as a client of the deployment sees it.

The engine model (``twin.engine``) times steps; a client's TTFT and inter-token gaps also hold the
path around the engine: HTTP, the ingress, the Ray handle call, the engine frontend (tokenising,
detokenising, the IPC with the engine core, the streamed chunks) and, where the frontend shares
CPU with the engine (the CPU build), the contention of that work with the engine's steps. The
term has these parts, each fitted from measured requests against the twin's replay of the very
same requests (``orchestrator.measure.serving_path``):

* ``step_scale``, ``prefill_token_ms``, ``decode_seq_ms``  under serving a step takes
                      ``step_scale`` x (the engine's time + ``prefill_token_ms`` per prompt
                      token in it) + ``decode_seq_ms`` per sequence that emits a token in it:
                      every token streamed costs the frontend, the replica and the ingress CPU
                      that the engine no longer has, and a long prefill stalls every decoder
                      behind it. The twin runs its step model so changed (``Profile.serving``),
                      so queueing, stalls and throughput feel it too. Fitted by replaying the
                      measured windows (a light and a heavier one) until their TPOT, ITL median,
                      throughput and TTFT agree (``fit_term``);
* ``request_ms`` (+ ``prompt_token_ms`` x prompt tokens, what the steps do not explain):
                      added to every request's first token (and so to its finish): the path in,
                      tokenising, the path of the first chunk out;
* ``ttft_noise_ms``   quantiles of what is left of TTFT after that line;
* ``itl_noise_ms``    quantiles of a measured gap minus its request's mean gap: the real
                      engine's step-to-step variation and the delivery jitter, zero on average
                      (the mean gap is the step terms'); the twin adds a draw to each of its gaps
                      (``itl_gaps``).

``apply``/``itl_gaps`` turn an engine run's records and gaps into the client's, seeded: pure.
Nothing here knows about Ray or vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize

QUANTILE_LEVELS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(20)) + (
    0.99, 1.0)
ITL_SAMPLES = 100_000  # Monte-Carlo draws for the gap quantiles of a run
MIN_REQUESTS = 20  # fewer measured requests than this identify nothing


class ServingPathError(ValueError):
    """A serving-path section or fit input that cannot be used; the message names the field."""


def _quantile_table(values: Any, where: str) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or len(values) != len(QUANTILE_LEVELS):
        raise ServingPathError(f"{where}: must be a list of {len(QUANTILE_LEVELS)} numbers "
                               f"(the quantiles at {list(QUANTILE_LEVELS)})")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ServingPathError(f"{where}: must hold numbers only") from None
    if any(not np.isfinite(v) for v in out):
        raise ServingPathError(f"{where}: must be finite")
    if any(b < a for a, b in zip(out, out[1:], strict=False)):
        raise ServingPathError(f"{where}: must be non-decreasing (quantiles)")
    return out


@dataclass(frozen=True)
class ServingPath:
    """The serving-path term of one profile (module docstring)."""

    step_scale: float
    decode_seq_ms: float
    request_ms: float
    prefill_token_ms: float
    prompt_token_ms: float
    ttft_noise_ms: tuple[float, ...]
    itl_noise_ms: tuple[float, ...]
    fitted_on: int  # measured requests the term was fitted on
    source: str = ""  # how it was measured (command, workload, date)
    breakdown_ms: dict[str, float] = field(default_factory=dict)  # median per hop, if stamped

    def __post_init__(self) -> None:
        if not 0.2 <= self.step_scale <= 5.0:
            raise ServingPathError(f"serving_path.step_scale: {self.step_scale} is outside "
                                   "[0.2, 5]")
        for name in ("decode_seq_ms", "request_ms", "prompt_token_ms", "prefill_token_ms"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ServingPathError(f"serving_path.{name}: must be a number >= 0, got {v}")
        if self.fitted_on < 0:
            raise ServingPathError("serving_path.fitted_on: must be >= 0")

    @staticmethod
    def engine_only(step_scale: float = 1.0, decode_seq_ms: float = 0.0,
                    prefill_token_ms: float = 0.0, source: str = "") -> ServingPath:
        """A term that changes the engine's steps and nothing else."""
        zero = (0.0,) * len(QUANTILE_LEVELS)
        return ServingPath(step_scale=step_scale, decode_seq_ms=decode_seq_ms,
                           prefill_token_ms=prefill_token_ms, request_ms=0.0,
                           prompt_token_ms=0.0, ttft_noise_ms=zero, itl_noise_ms=zero,
                           fitted_on=0, source=source)

    def describe(self) -> str:
        return (f"step x{self.step_scale:.2f} (+{self.prefill_token_ms * 1e3:.0f} us/prefill "
                f"token) + {self.decode_seq_ms:.2f} ms per decoding sequence, serving path "
                f"{self.request_ms:.1f} ms + "
                f"{self.prompt_token_ms * 1e3:.0f} us/prompt token, gap noise p1 "
                f"{_at(self.itl_noise_ms, 0.01):+.1f} / p99 {_at(self.itl_noise_ms, 0.99):+.1f}"
                f" ms, fitted on {self.fitted_on:,} requests")

    # --- applying -----------------------------------------------------------------------
    def apply(self, arrival_s: np.ndarray, prompt_len: np.ndarray, first_token_s: np.ndarray,
              finish_s: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The client's first-token and finish times for an engine run's (NaN stays NaN): each
        request's whole stream is later by its TTFT term plus a noise draw."""
        rng = np.random.default_rng([seed, 0x5E21])
        delay_s = (self.request_ms + self.prompt_token_ms * prompt_len.astype(float)
                   + _inverse_cdf(rng.random(len(arrival_s)), self.ttft_noise_ms)) / 1e3
        first = np.maximum(first_token_s + delay_s, arrival_s)
        finish = np.maximum(finish_s + delay_s, first)
        return first, finish

    def itl_gaps(self, gap_ms: np.ndarray, weight: np.ndarray, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """The client's inter-chunk gaps as an equally weighted sample: engine gaps drawn by
        their weights plus a noise draw each (the two are independent), clipped at 0."""
        w = np.asarray(weight, dtype=float)
        if len(gap_ms) == 0 or w.sum() <= 0:
            return np.asarray(gap_ms, dtype=float), w
        rng = np.random.default_rng([seed, 0x17A])
        n = int(min(ITL_SAMPLES, max(1000, w.sum())))
        picked = rng.choice(len(gap_ms), size=n, p=w / w.sum())
        out = np.maximum(np.asarray(gap_ms, dtype=float)[picked]
                         + _inverse_cdf(rng.random(n), self.itl_noise_ms), 0.0)
        return out, np.ones(n)

    # --- I/O ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "step_scale": round(self.step_scale, 5),
            "decode_seq_ms": round(self.decode_seq_ms, 5),
            "prefill_token_ms": round(self.prefill_token_ms, 6),
            "request_ms": round(self.request_ms, 4),
            "prompt_token_ms": round(self.prompt_token_ms, 6),
            "quantile_levels": list(QUANTILE_LEVELS),
            "ttft_noise_ms": [round(v, 4) for v in self.ttft_noise_ms],
            "itl_noise_ms": [round(v, 4) for v in self.itl_noise_ms],
            "fitted_on": self.fitted_on,
            "source": self.source,
            "breakdown_ms": {k: round(float(v), 3) for k, v in self.breakdown_ms.items()},
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "serving_path") -> ServingPath:
        if not isinstance(d, dict):
            raise ServingPathError(f"{where}: must be a mapping")
        known = {"step_scale", "decode_seq_ms", "prefill_token_ms", "request_ms",
                 "prompt_token_ms",
                 "quantile_levels", "ttft_noise_ms", "itl_noise_ms", "fitted_on", "source",
                 "breakdown_ms"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ServingPathError(f"{where}: unknown field(s) {unknown}")
        levels = d.get("quantile_levels", list(QUANTILE_LEVELS))
        if [round(float(x), 4) for x in levels] != [round(x, 4) for x in QUANTILE_LEVELS]:
            raise ServingPathError(f"{where}.quantile_levels: must be {list(QUANTILE_LEVELS)}")
        num = {}
        for key in ("step_scale", "decode_seq_ms", "prefill_token_ms", "request_ms",
                    "prompt_token_ms"):
            v = d.get(key, 0.0 if key == "prefill_token_ms" else None)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ServingPathError(f"{where}.{key}: must be a number, got {v!r}")
            num[key] = float(v)
        fitted = d.get("fitted_on", 0)
        if isinstance(fitted, bool) or not isinstance(fitted, int):
            raise ServingPathError(f"{where}.fitted_on: must be an integer, got {fitted!r}")
        breakdown = d.get("breakdown_ms") or {}
        if not isinstance(breakdown, dict):
            raise ServingPathError(f"{where}.breakdown_ms: must be a mapping")
        try:
            return cls(**num, fitted_on=fitted, source=str(d.get("source", "")),
                       ttft_noise_ms=_quantile_table(d.get("ttft_noise_ms"),
                                                     f"{where}.ttft_noise_ms"),
                       itl_noise_ms=_quantile_table(d.get("itl_noise_ms"),
                                                    f"{where}.itl_noise_ms"),
                       breakdown_ms={str(k): float(v) for k, v in breakdown.items()})
        except ServingPathError as exc:
            raise ServingPathError(str(exc).replace("serving_path", where, 1)) from None


def _at(table: tuple[float, ...], q: float) -> float:
    return float(np.interp(q, QUANTILE_LEVELS, table))


def _inverse_cdf(u: np.ndarray, table: tuple[float, ...]) -> np.ndarray:
    """Draws from a distribution given by its quantiles at ``QUANTILE_LEVELS`` (piecewise
    linear between them)."""
    return np.interp(u, QUANTILE_LEVELS, table)


def quantile_table(x: np.ndarray) -> tuple[float, ...]:
    """``x``'s quantiles at ``QUANTILE_LEVELS``."""
    return tuple(float(v) for v in np.quantile(np.asarray(x, dtype=float), QUANTILE_LEVELS))


# --- fitting -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredRequests:
    """What a client measured, per request, aligned with the replayed batch (NaN: did not
    happen). ``gaps_ms[i]``: request i's inter-chunk gaps."""

    prompt_len: np.ndarray
    output_len: np.ndarray
    send_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    gaps_ms: list[list[float]]


def fit_serving_path(meas: MeasuredRequests, steps: ServingPath, replay_first_s: np.ndarray,
                     *, source: str = "", breakdown_ms: dict[str, float] | None = None
                     ) -> ServingPath:
    """The TTFT line and its noise, given the replay of the same requests with ``steps`` (its
    step terms and gap noise are kept). The
    line is fitted by least squares on the requests inside 3 MADs of a first fit (a request
    stuck behind a GC pause must not tilt it), with both coefficients kept >= 0."""
    ok = np.isfinite(meas.first_token_s) & np.isfinite(replay_first_s)
    if ok.sum() < MIN_REQUESTS:
        raise ServingPathError(f"ttft: {int(ok.sum())} requests have a first token in both the "
                               f"measurement and the replay; need {MIN_REQUESTS}")
    resid = (meas.first_token_s - replay_first_s)[ok] * 1e3  # the replay arrives at send_s
    p = meas.prompt_len[ok].astype(float)
    a, b = _line(p, resid)
    left = resid - (a + b * p)
    mad = float(np.median(np.abs(left - np.median(left)))) or 1e-9
    keep = np.abs(left - np.median(left)) <= 3 * 1.4826 * mad
    if keep.sum() >= MIN_REQUESTS:
        a, b = _line(p[keep], resid[keep])
    return ServingPath(step_scale=steps.step_scale, decode_seq_ms=steps.decode_seq_ms,
                       prefill_token_ms=steps.prefill_token_ms, request_ms=a,
                       prompt_token_ms=b, ttft_noise_ms=quantile_table(resid - (a + b * p)),
                       itl_noise_ms=steps.itl_noise_ms, fitted_on=int(ok.sum()),
                       source=source, breakdown_ms=dict(breakdown_ms or {}))


# replay(term, k): window k replayed as a client sees it with ``term`` (``simulate_requests``
# with a profile holding it) -> (first token s, finish s) aligned with the window's requests,
# and the window's figures
Replayer = Callable[[ServingPath, int], tuple[np.ndarray, np.ndarray, dict[str, Any]]]
STEP_FIGURES = ("tpot_mean_ms", "itl_median_ms", "total_throughput_tps")


def fit_term(windows: Sequence[MeasuredRequests], figures: Sequence[dict[str, Any]],
             replay: Replayer, *, source: str = "",
             breakdown_ms: dict[str, float] | None = None) -> ServingPath:
    """The whole term from measured windows (the first light, the others heavier up to a
    saturated one) and their measured ``figures`` (``twin.metrics`` keys).

    The gap noise comes from the light window's gaps alone. The step terms then minimise,
    over every window, the squared log errors of the client-view replay's TPOT mean, ITL
    median and throughput, plus the TTFT median of the heavier windows (the light window's
    median TTFT residual added as the path) and the slope of the light window's TTFT residual
    on the prompt length (prefill the steps miss) - Nelder-Mead from (1, 0, 0). Last, the
    TTFT line on the light window (queueing must not be read as path)."""
    noise = gap_noise(windows[0])
    zero = (0.0,) * len(QUANTILE_LEVELS)

    def steps(x: np.ndarray) -> ServingPath:
        a, c, d = np.exp(np.clip(x[0], -1.6, 1.6)), max(x[1], 0.0), max(x[2], 0.0)
        return ServingPath(step_scale=float(a), decode_seq_ms=float(c),
                           prefill_token_ms=float(d), request_ms=0.0, prompt_token_ms=0.0,
                           ttft_noise_ms=zero, itl_noise_ms=noise, fitted_on=0)

    def loss(x: np.ndarray) -> float:
        t = steps(x)
        reps = [replay(t, k) for k in range(len(windows))]
        first0 = reps[0][0]
        path = float(np.nanmedian((windows[0].first_token_s - first0) * 1e3))
        err = 0.0
        for k, ((_, _, rep), meas) in enumerate(zip(reps, figures, strict=True)):
            for key in STEP_FIGURES:
                if _pos(meas.get(key)) and _pos(rep.get(key)):
                    err += float(np.log(rep[key] / meas[key])) ** 2
            if k and _pos(meas.get("ttft_median_ms")):
                err += float(np.log(max(rep["ttft_median_ms"] + path, 1e-3)
                                    / meas["ttft_median_ms"])) ** 2
        line = fit_serving_path(windows[0], t, first0)
        return err + (line.prompt_token_ms / 0.1) ** 2  # 0.1 ms/token: a 1.0 penalty

    best = minimize(loss, np.array([0.0, 0.0, 0.0]), method="Nelder-Mead",
                    options={"xatol": 0.01, "fatol": 1e-4, "maxfev": 200,
                             "initial_simplex": [[0, 0, 0], [0.7, 0, 0], [0, 1.0, 0],
                                                 [0, 0, 0.2]]})
    t = steps(best.x)
    first, _, _ = replay(t, 0)
    return fit_serving_path(windows[0], t, first, source=source, breakdown_ms=breakdown_ms)


def gap_noise(meas: MeasuredRequests) -> tuple[float, ...]:
    """Quantiles of every measured gap minus its request's mean gap (requests with 3+
    tokens): the within-request variation the twin's steps do not have."""
    noise = [g - float(np.mean(gs)) for i in range(len(meas.gaps_ms))
             if np.isfinite(meas.first_token_s[i]) and len(gs := meas.gaps_ms[i]) > 1
             for g in gs]
    if len(noise) < MIN_REQUESTS:
        raise ServingPathError(f"itl: {len(noise)} measured gaps of requests with 3+ tokens; "
                               f"need {MIN_REQUESTS}")
    return quantile_table(np.asarray(noise))


def _pos(x: Any) -> bool:
    return isinstance(x, (int, float)) and bool(np.isfinite(x)) and x > 0


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y ~ a + b x by least squares, a and b >= 0 (a flat line at the mean when b < 0 would
    fit; the slope alone when a < 0 would)."""
    if np.ptp(x) > 0:
        b, a = np.polyfit(x, y, 1)
    else:
        a, b = float(np.mean(y)), 0.0
    if b < 0:
        a, b = float(np.mean(y)), 0.0
    if a < 0:
        a, b = 0.0, max(0.0, float(np.dot(x, y) / max(np.dot(x, x), 1e-12)))
    return max(float(a), 0.0), max(float(b), 0.0)
