"""The lower bound on replicas printed with every plan: a bound by construction.

No plan the twin accepts can use fewer replicas than this. It is the step-time model's
roofline: every engine step costs at least its fixed cost, every prompt token at least the
prefill cost, every decode token at least the cheaper of the graph and eager per-row costs,
every token of an adapter at least the LoRA kernels' per-token work at that adapter's slot rank
(the replica's ``max_lora_rank`` is never smaller), and every decode attends at least its own
context; a step holds at most ``max_num_batched_tokens`` tokens and ``max_num_seqs`` decodes.
The step model's coefficients are non-negative (fitted by NNLS; ``compute_lower_bound`` refuses
a model with negative ones), so every term it leaves out only adds time.

A replica the twin does not starve completes at least ``STARVED_BELOW`` of its offered tokens,
so the fleet does at least the work of the offered requests minus the costliest
(1 - STARVED_BELOW) of their tokens: requests sorted by work per token, the most expensive ones
dropped until that share of the tokens is gone. That work per second, over the one second of
engine time a replica has per second, is the bound:

    replicas >= ceil(work of what must be served per second [ms] / 1000)

whatever the placement, the max_loras or the mix per replica. The offered requests are a
fixed-seed sample of ``SAMPLE`` (lengths from the workload's model, adapters by rate), their
work lowered by ``SAMPLE_MARGIN`` for its sampling error. The bound is loose where queueing,
the LoRA admission rule or KV memory decide (it ignores them); ``placement.capacity_estimate``
is the planner's estimate of what the mix needs, and the audit (``benchmarks/plan_audit.py``)
reports plans against the fewest replicas the twin accepts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from placement.context import PlacementContext
from placement.errors import PlacementError
from twin.config import smallest_valid_rank
from twin.latency import FEATURES, rank_tiles
from twin.workload import Workload

STARVED_BELOW = 0.9  # twin/metrics: starved = fewer than 90 % of the offered tokens served
SAMPLE = 20_000  # requests drawn from the workload for the expectations (fixed seed)
SAMPLE_SEED = 20_240_601
SAMPLE_MARGIN = 0.98  # the sample's means are lowered by this much (their sampling error)
MIN_SLOTS = 1  # a LoRA-enabled replica has at least one slot: (max_loras + 1) >= 2 blocks


@dataclass(frozen=True)
class LowerBound:
    """The fewest replicas any plan can have (module notes), and what it rests on."""

    replicas: int
    busy_ms_per_s: float  # the least engine time per second an accepted fleet spends
    terms: Mapping[str, float] = field(default_factory=dict)  # ms/s by kind of work


def compute_lower_bound(workload: Workload, ctx: PlacementContext) -> LowerBound:
    """The roofline bound of ``workload`` on ``ctx``'s profile (module notes)."""
    m = ctx.profile.serving().step_model  # the steps the twin runs (serving path included)
    negative = [f for f in FEATURES if getattr(m, f) < 0]
    if negative:
        raise PlacementError(f"{ctx.profile.name}: step_model coefficients {negative} are "
                             "negative; the lower bound needs a non-negative step model "
                             "(`lorafleet calibrate` fits one)")
    rates = np.array([a.rate_rps for a in workload.adapters], dtype=float)
    base = workload.base_model_rate_rps
    total = float(rates.sum()) + base
    if total <= 0:
        return LowerBound(replicas=1, busy_ms_per_s=0.0)
    rng = np.random.default_rng(SAMPLE_SEED)
    prompt, output = (np.asarray(x, dtype=float) for x in workload.lengths.sample(rng, SAMPLE))
    # each request's adapter by rate: its slot rank's tiles (0 for the base model)
    tiles_of = np.array([float(rank_tiles(smallest_valid_rank(a.rank)))
                         for a in workload.adapters] + [0.0])
    who = rng.choice(len(tiles_of), size=SAMPLE, p=np.append(rates, base) / total)
    tiles = tiles_of[who]
    lora = (tiles > 0).astype(float)
    decode = np.maximum(output - 1.0, 0.0)
    tokens = prompt + decode
    graph_row = m.graph_decode_tokens if m.cuda_graph_max_tokens > 0 else m.eager_decode_seqs
    work = {  # ms per request, by kind of work
        "prefill": prompt * (m.prefill_tokens + lora * m.lora_prefill_ktokens / 1e3),
        "decode": decode * min(graph_row, m.eager_decode_seqs),
        # per token: the real work at the slot rank; the expand grid's (max_loras + 1) >= 2
        # blocks; the shrink grid's SPLIT_K (>= 8) x 1/32 x tiles x (max_loras + 1) blocks
        "lora_tokens": tokens * (tiles * m.lora_ktokens / 1e3
                                 + lora * (MIN_SLOTS + 1) * m.lora_slot_mtokens / 1e6
                                 + tiles * (MIN_SLOTS + 1) * 8.0 / 32.0 * m.lora_shrink_kctas
                                 / 1e3),
        # decode j attends to at least the prompt and the j tokens before it
        "attention": (decode * prompt + decode * (decode + 1.0) / 2.0) * m.ctx_ktokens / 1e3,
    }
    per_request = sum(work.values())
    # what a fleet that starves no replica must still do: drop the costliest requests (by work
    # per token) up to the share of tokens a replica may leave unserved
    order = np.argsort(-per_request / np.maximum(tokens + 1.0, 1.0), kind="stable")
    may_drop = (1.0 - STARVED_BELOW) * float((tokens + 1.0).sum()) * (1.0 + 1e-12)
    dropped = np.cumsum(tokens[order] + 1.0) <= may_drop
    keep = np.ones(SAMPLE, dtype=bool)
    keep[order[dropped]] = False
    scale = total / SAMPLE * SAMPLE_MARGIN  # sampled requests -> requests per second
    terms = {k: float(v[keep].sum()) * scale for k, v in work.items()}
    steps = max(float(tokens[keep].sum()) * scale / ctx.max_num_batched_tokens,
                float(decode[keep].sum()) * scale / ctx.max_num_seqs)
    per_step = m.const + (m.lora_const + m.lora_adapters if rates.sum() > 0 else 0.0)
    terms["steps"] = steps * per_step
    busy = float(sum(terms.values()))
    return LowerBound(replicas=max(1, math.ceil(busy / 1000.0 - 1e-9)), busy_ms_per_s=busy,
                      terms={k: round(v, 3) for k, v in terms.items()})
