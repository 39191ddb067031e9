"""The figures of vLLM's serving benchmark, computed from an engine run.

Definitions follow the benchmark the reference runs used (and the reference README): throughput
counts only requests *completed* inside the window, divided by the window; TTFT and TPOT are
averaged over completed requests; ITL pools every inter-token gap of completed requests (so it is
token-weighted). A run is *starved* when the tokens of completed requests fall below 90 % of the
tokens offered in the window — the engine cannot keep up and its queue grows without bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

STARVATION_THRESHOLD = 0.9


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Quantile of a weighted sample (nan if empty)."""
    return weighted_quantiles(values, weights, (q,))[0]


def weighted_quantiles(values: np.ndarray, weights: np.ndarray,
                       qs: tuple[float, ...]) -> list[float]:
    """Quantiles of a weighted sample: for each q, the first value in sorted order whose
    cumulative weight reaches q of the total (nan if empty). A selection, not a sort: a twin
    hour has ~10^5 step gaps. Integer weights keep every partial sum exact."""
    total = float(weights.sum()) if len(values) else 0.0
    if total <= 0:
        return [float("nan")] * len(qs)
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float)
    return [float(_weighted_select(v.copy(), w.copy(), q * total)) for q in qs]


@njit(cache=True)
def _weighted_select(v: np.ndarray, w: np.ndarray, target: float) -> float:
    """Smallest x with weight(values <= x) >= target (three-way quickselect, in place)."""
    lo, hi = 0, len(v)
    below = 0.0  # weight of the values known to lie below v[lo:hi]
    while hi - lo > 1:
        a, b, c = v[lo], v[(lo + hi) // 2], v[hi - 1]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        lt, i, gt = lo, lo, hi  # [lo, lt) < pivot, [lt, i) == pivot, [gt, hi) > pivot
        w_lt = w_eq = 0.0
        while i < gt:
            x = v[i]
            if x < pivot:
                v[i], v[lt] = v[lt], x
                w[i], w[lt] = w[lt], w[i]
                w_lt += w[lt]
                lt += 1
                i += 1
            elif x > pivot:
                gt -= 1
                v[i], v[gt] = v[gt], x
                w[i], w[gt] = w[gt], w[i]
            else:
                w_eq += w[i]
                i += 1
        if below + w_lt >= target:
            hi = lt
        elif below + w_lt + w_eq >= target:
            return pivot
        else:
            below += w_lt + w_eq
            lo = gt
    return v[lo] if hi > lo else v[lo - 1]


def _stats(x: np.ndarray, prefix: str) -> dict[str, float]:
    if len(x) == 0:
        nan = float("nan")
        return {f"{prefix}_mean_ms": nan, f"{prefix}_median_ms": nan, f"{prefix}_p99_ms": nan}
    return {
        f"{prefix}_mean_ms": float(np.mean(x)),
        f"{prefix}_median_ms": float(np.median(x)),
        f"{prefix}_p99_ms": float(np.percentile(x, 99)),
    }


@dataclass(frozen=True)
class RequestRecords:
    """Per-request outcome of a run, aligned with the request batch (NaN = did not happen)."""

    arrival_s: np.ndarray
    adapter: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    generated: np.ndarray
    preemptions: np.ndarray
    rejected: np.ndarray

    def completed_mask(self, window_s: float) -> np.ndarray:
        return np.isfinite(self.finish_s) & (self.finish_s <= window_s)


def aggregate_metrics(
    rec: RequestRecords,
    window_s: float,
    itl_gap_ms: np.ndarray,
    itl_weight: np.ndarray,
    preempt_gap_ms: np.ndarray,
) -> dict[str, Any]:
    """Benchmark-style summary of one run over ``[0, window_s)``."""
    done = rec.completed_mask(window_s)
    offered = rec.arrival_s < window_s
    n_done = int(done.sum())
    inp = rec.prompt_len[done].astype(float)
    out = rec.generated[done].astype(float)
    ttft = (rec.first_token_s[done] - rec.arrival_s[done]) * 1e3
    latency = (rec.finish_s[done] - rec.arrival_s[done]) * 1e3
    multi = out > 1
    tpot = (latency[multi] - ttft[multi]) / (out[multi] - 1)
    decode_time = float(np.sum(latency[multi] - ttft[multi]))
    decode_tokens = float(np.sum(out[multi] - 1))

    gaps = np.concatenate([itl_gap_ms, preempt_gap_ms])
    weights = np.concatenate([itl_weight.astype(float), np.ones(len(preempt_gap_ms))])
    offered_tokens = float(
        rec.prompt_len[offered].sum(dtype=np.int64) + rec.output_len[offered].sum(dtype=np.int64)
    )
    done_tokens = float(inp.sum() + out.sum())
    m: dict[str, Any] = {
        "completed": n_done,
        "offered_requests": int(offered.sum()),
        "rejected": int(rec.rejected[offered].sum()),
        "duration_s": float(window_s),
        "total_input_tokens": int(inp.sum()),
        "total_output_tokens": int(out.sum()),
        "request_throughput_rps": n_done / window_s,
        "input_throughput_tps": float(inp.sum()) / window_s,
        "output_throughput_tps": float(out.sum()) / window_s,
        "total_throughput_tps": done_tokens / window_s,
        "offered_total_tps": offered_tokens / window_s,
    }
    m.update(_stats(ttft, "ttft"))
    m.update(_stats(tpot, "tpot"))
    m["itl_mean_ms"] = decode_time / decode_tokens if decode_tokens else float("nan")
    m["itl_median_ms"], m["itl_p99_ms"] = weighted_quantiles(gaps, weights, (0.5, 0.99))
    m["completed_token_fraction"] = done_tokens / offered_tokens if offered_tokens else 1.0
    m["starved"] = bool(offered_tokens > 0 and done_tokens < STARVATION_THRESHOLD * offered_tokens)
    m["preemptions"] = int(rec.preemptions.sum())
    return m


def per_adapter_metrics(rec: RequestRecords, window_s: float, adapter_ids: list[str]) -> list[dict]:
    """Offered vs completed load, TTFT and starvation for every adapter (one dict each)."""
    done = rec.completed_mask(window_s)
    offered = rec.arrival_s < window_s
    n = len(adapter_ids)
    a = rec.adapter
    valid = a >= 0
    tokens = (rec.prompt_len + rec.output_len).astype(float)
    off_req = np.bincount(a[offered & valid], minlength=n)
    off_tok = np.bincount(a[offered & valid], weights=tokens[offered & valid], minlength=n)
    dmask = done & valid
    done_tok = np.bincount(
        a[dmask], weights=(rec.prompt_len + rec.generated)[dmask].astype(float), minlength=n
    )
    done_req = np.bincount(a[dmask], minlength=n)
    ttft_sum = np.bincount(
        a[dmask], weights=(rec.first_token_s - rec.arrival_s)[dmask] * 1e3, minlength=n
    )
    rows = []
    for i, aid in enumerate(adapter_ids):
        frac = done_tok[i] / off_tok[i] if off_tok[i] else 1.0
        rows.append(
            {
                "adapter": aid,
                "offered_requests": int(off_req[i]),
                "completed": int(done_req[i]),
                "offered_tps": off_tok[i] / window_s,
                "total_throughput_tps": done_tok[i] / window_s,
                "ttft_mean_ms": ttft_sum[i] / done_req[i] if done_req[i] else float("nan"),
                "completed_token_fraction": frac,
                "starved": bool(off_tok[i] > 0 and frac < STARVATION_THRESHOLD),
            }
        )
    return rows
