"""The figures of vLLM's serving benchmark, computed from an engine run.

Definitions follow the benchmark the reference runs used (and the reference README): throughput
counts only requests *completed* inside the window, divided by the window; TTFT and TPOT are
averaged over completed requests; ITL pools every inter-token gap of completed requests (so it is
token-weighted). A run is *starved* when the tokens of completed requests fall below 90 % of the
tokens offered in the window — the engine cannot keep up and its queue grows without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

STARVATION_THRESHOLD = 0.9


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Quantile of a weighted sample (nan if empty)."""
    return weighted_quantiles(values, weights, (q,))[0]


def weighted_quantiles(values: np.ndarray, weights: np.ndarray,
                       qs: tuple[float, ...]) -> list[float]:
    """Quantiles of a weighted sample, one sort for all of them: for each q, the first value in
    sorted order whose cumulative weight reaches q of the total (nan if empty). Ties need no
    stable order: whichever order equal values take, the value found is the same."""
    if len(values) == 0 or weights.sum() <= 0:
        return [float("nan")] * len(qs)
    order = np.argsort(values)
    v = values[order]
    cw = np.cumsum(weights[order], dtype=float)
    idx = np.searchsorted(cw, np.asarray(qs) * cw[-1], side="left")
    return [float(v[min(int(i), len(v) - 1)]) for i in idx]


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
    quantiles: Callable[[np.ndarray, np.ndarray, tuple[float, ...]], list[float]] | None = None,
) -> dict[str, Any]:
    """Benchmark-style summary of one run over ``[0, window_s)``. ``quantiles`` computes the
    weighted ITL quantiles (default ``weighted_quantiles``; the twin passes its compiled
    selection, ``twin.engine.quantiles``, which gives the same values)."""
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
    m["itl_median_ms"], m["itl_p99_ms"] = (quantiles or weighted_quantiles)(gaps, weights,
                                                                         (0.5, 0.99))
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
