"""Replay in the twin exactly the requests a live window served: like for like.

A live window and a plan's prediction differ in more than the twin's error: the window's
requests are one Poisson draw (the demo's 60 s offered 4.95 req/s against a nominal 4.5), and
the plan predicts an hour. ``replay_window`` gives each replica's twin the very requests that
replica served, at the times the client sent them, with the replica's engine configuration, and
scores the result with the same metric code: what is left between measured and replayed is the
twin's error. With a profile that measured its serving path the replay is a client's view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from load_tests.openloop import OpenLoopResult
from placement.plan import Plan
from twin.engine.quantiles import weighted_quantiles
from twin.metrics import RequestRecords, aggregate_metrics
from twin.profile import Profile
from twin.simulate import simulate_requests
from twin.workload import RequestBatch


@dataclass(frozen=True)
class Replay:
    """The twin's figures for a live window: whole and per replica, and per request (aligned
    with the window's batch; NaN for requests no replica served)."""

    metrics: dict[str, Any]
    per_replica: dict[str, dict[str, Any]]
    first_token_s: np.ndarray
    finish_s: np.ndarray


def replay_window(res: OpenLoopResult, plan: Plan, profile: Profile, *, seed: int = 0,
                  serving: bool = True) -> Replay:
    """Each replica's requests (``res.replica``) replayed on its group's engine from the
    client's send times over the window (``serving``: see ``twin.simulate.simulate_requests``)."""
    batch, window = res.batch, res.meas.window_s
    n = len(batch)
    ranks = [a.rank for a in res.workload.adapters]
    ids = [a.id for a in res.workload.adapters]
    first, finish = np.full(n, np.nan), np.full(n, np.nan)
    generated = np.zeros(n, dtype=np.int64)
    preempt, rejected = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    gaps, weights = [], []
    per: dict[str, dict[str, Any]] = {}
    rep = np.asarray(res.replica)
    send = np.where(np.isfinite(res.meas.send_s), res.meas.send_s, batch.arrival_s)
    for rid in sorted(set(res.replica) - {""}):
        idx = np.flatnonzero(rep == rid)
        order = idx[np.argsort(send[idx], kind="stable")]
        sub = RequestBatch(send[order], batch.adapter[order], batch.prompt_len[order],
                           batch.output_len[order])
        config = plan.group(rid.split("/")[0]).engine
        sim = simulate_requests(sub, ranks, config, profile, window, ids, serving=serving,
                                seed=seed)
        per[rid] = sim.metrics
        r = sim.records
        first[order], finish[order] = r.first_token_s, r.finish_s
        generated[order], preempt[order], rejected[order] = r.generated, r.preemptions, r.rejected
        gaps.append(sim.itl_gaps_ms)
        weights.append(sim.itl_weights)
    rec = RequestRecords(send, batch.adapter, batch.prompt_len, batch.output_len, first, finish,
                         generated, preempt, rejected)
    g = np.concatenate(gaps) if gaps else np.zeros(0)
    w = np.concatenate(weights) if weights else np.zeros(0)
    metrics = aggregate_metrics(rec, window, g, w, np.zeros(0), quantiles=weighted_quantiles)
    return Replay(metrics, per, first, finish)
