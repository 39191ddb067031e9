"""The surrogate's inputs: physically meaningful summaries of (ReplicaLoad, EngineConfig, Profile).

One code path builds the feature matrix for training (thousands of twin runs) and for prediction
(placement's inner loop), so a model never sees features computed differently from the ones it
was fitted on. The per-adapter summaries (rate skew, rank mix, expected active adapters) and a
cheap analytic capacity estimate run in one compiled kernel over all loads at once: the
placement loop calls this on thousands of candidates, and per-call numpy overhead would
otherwise dominate.

The capacity estimate is the profile's own step-time model (``twin.latency``) applied to a
steady-state engine: a request costs ``w`` ms of marginal step time (its prompt tokens, its
decode steps with their context and the LoRA kernels' per-token and per-slot costs), a step has
a fixed cost ``c0``; at a batch of ``B`` decoding requests the engine completes
``1000 B / (O c0 + B w)`` requests/s, largest at the batch that memory, ``max_num_seqs`` and the
token budget allow. It ignores queueing, preemption and the LoRA admission rule — the trees
learn those — but it puts "how loaded is this replica" on one axis.

A client that holds at most C requests in flight (``ReplicaLoad.client_max_inflight``; the
reference harness had such a cap) bounds the queue an overloaded replica walks: ``client_cap_s``
= C / offered rate, and ``client_cap_fill_s`` = C / (offered − analytic capacity), the time an
overloaded queue takes to reach the cap, to be compared with the window. Both are
``CAP_NEVER_S`` for an unbounded client.

The LoRA admission rule gets its own summaries, because it decides latency where more adapters
are active than there are slots: an adapter leaves the slot set only when it has no running
request, so adapters busy almost all the time lock their slots and the rest wait for the hottest
ones to go idle (``locking_per_slot``, ``slot_turnover_per_s``, ``slot_wait_est_s``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# numba compiles the feature kernel (and twin.surrogate's forest walk): a declared dependency
# (pyproject.toml), never an optional one whose absence silently makes planning 100x slower
from numba import njit

from twin.config import EngineConfig
from twin.lengths import LengthModel
from twin.profile import Profile
from twin.replica import ReplicaLoad

FEATURE_NAMES: tuple[str, ...] = (
    "n_adapters",
    "total_rate_rps",
    "offered_tps",
    "mean_prompt",
    "mean_output",
    "prompt_cv",
    "output_cv",
    "max_loras",
    "max_lora_rank",
    "max_loras_per_adapter",
    "cpu_slots_per_adapter",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_tokens",
    "kv_requests",
    "share_top1",
    "share_top_slots",
    "entropy_norm",
    "effective_adapters_per_slot",
    "rank8_share",
    "rank16_share",
    "rank32_share",
    "rank64_share",
    "max_rank",
    "mean_rank",
    "step_ms_est",
    "batch_est",
    "active_adapters_est",
    "active_per_slot",
    "capacity_rps",
    "capacity_tps",
    "load_ratio",
    "rho",
    "locking_per_slot",
    "slot_turnover_per_s",
    "slot_wait_est_s",
    "ttft_light_est_ms",
    "client_cap_s",
    "client_cap_fill_s",
)
N_FEATURES = len(FEATURE_NAMES)
_N_KERNEL = FEATURE_NAMES.index("client_cap_s")  # the first client-cap column
# Seconds standing for "never": an unbounded client (a replica in a plan), or a cap the queue
# never reaches. Far beyond any window, so the trees split it off cleanly.
CAP_NEVER_S = 1e7
# Per-load scalars handed to the kernel, in this order.
_SCALARS = ("max_loras", "max_lora_rank", "max_num_seqs", "budget", "cpu_slots", "kv_tokens",
            "mean_prompt", "mean_output", "prompt_cv", "output_cv")
# Step-model coefficients the kernel reads (twin.latency), by name: the model may grow terms.
_STEP_COEFS = ("const", "prefill_tokens", "eager_decode_seqs", "eager_const", "ctx_ktokens",
               "lora_const", "lora_ktokens", "lora_prefill_ktokens", "lora_adapters",
               "lora_adapter_rank_tiles", "lora_slot_mtokens", "lora_shrink_kctas")
_LENGTH_SAMPLE = 4096  # fixed-seed sample for the length spreads (means are exact)
_BLOCK_HALF = 8.0  # half a 16-token KV block of paging slack per running request
_LOCKED = 3.0  # rate x request life above which an adapter is idle < 5 % of the time
_MAX_WAIT_S = 1e6
_MIN_CHUNK = 64.0


@njit(cache=True)
def _step_ms(c_const, c_eager_const, c_lconst, per_adapter, active, b_max, w, o, rho):
    """(fixed cost of a saturated step, step time at utilisation rho), both in ms."""
    lora_fixed = c_lconst + per_adapter * active
    c0_sat = c_const + c_eager_const + lora_fixed
    t_sat = c0_sat + b_max * w / o
    t_light = (c_const + lora_fixed) / (1.0 - rho) if rho < 1.0 else t_sat
    return c0_sat, min(t_light, t_sat)


@njit(cache=True, fastmath=True)
def _kernel(offsets, rates, ranks, scal, coef, out):  # noqa: C901 - one pass, kept together
    """Fill ``out[i]`` (FEATURE_NAMES order) for every load ``i``; see the module docstring."""
    c_const, c_prefill, c_eager, c_eager_const = coef[0], coef[1], coef[2], coef[3]
    c_ctx, c_lconst, c_lktok, c_lprefill = coef[4], coef[5], coef[6], coef[7]
    c_ladapter, c_ladapter_tile, c_lslot, c_lshrink = coef[8], coef[9], coef[10], coef[11]
    n_loads = offsets.shape[0] - 1
    for i in range(n_loads):
        s, e = offsets[i], offsets[i + 1]
        n = e - s
        sc = scal[i]
        g, r, mns, budget, cpu, kv = sc[0], sc[1], sc[2], sc[3], sc[4], sc[5]
        p, o, pcv, ocv = sc[6], sc[7], sc[8], sc[9]
        lam = 0.0
        top1 = 0.0
        max_rank = 0.0
        rank_sum = 0.0
        shares = np.zeros(4)
        for j in range(s, e):
            q = rates[j]
            lam += q
            top1 = max(top1, q)
            rk = ranks[j]
            max_rank = max(max_rank, rk)
            rank_sum += q * rk
            b = 0 if rk <= 8 else (1 if rk <= 16 else (2 if rk <= 32 else 3))
            shares[b] += q
        entropy = 0.0
        if lam > 0:
            for j in range(s, e):
                if rates[j] > 0:
                    f = rates[j] / lam
                    entropy -= f * math.log(f)
        k = n - int(g)  # adapters that do not fit the slots
        top = rates[s:e] if k <= 0 else np.partition(rates[s:e], k)[k:]  # the hottest g
        top_slots = top.sum()
        inv = 1.0 / lam if lam > 0 else 0.0
        row = out[i]
        row[0] = n
        row[1] = lam
        row[2] = lam * (p + o)
        row[3] = p
        row[4] = o
        row[5] = pcv
        row[6] = ocv
        row[7] = g
        row[8] = r
        row[9] = g / max(n, 1)
        row[10] = min(cpu / max(n, 1), 1.0)
        row[11] = mns
        row[12] = budget
        row[13] = kv
        ctx = p + 0.5 * o + _BLOCK_HALF
        row[14] = kv / ctx
        row[15] = top1 * inv if lam > 0 else 1.0
        row[16] = top_slots * inv if lam > 0 else 1.0
        row[17] = entropy / math.log(n) if n > 1 else 1.0
        row[18] = math.exp(entropy) / g
        for b in range(4):
            row[19 + b] = shares[b] * inv
        row[23] = max_rank
        row[24] = rank_sum * inv

        # --- analytic steady state from the step-time model (ms) ---
        tiles = math.ceil(r / 16.0)
        per_adapter = c_ladapter + c_ladapter_tile * (tiles - 1)
        per_token_lora = c_lktok * tiles / 1e3 + c_lslot * (g + 1) / 1e6 + (
            c_lshrink * 8.0 * tiles * (g + 1) / 32.0 / 1e3
        )
        w = p * (c_prefill + c_lprefill / 1e3 + per_token_lora) + o * (
            c_eager + per_token_lora + c_ctx * ctx / 1e3
        )
        b_max = min(mns, kv / ctx, budget * o / (p + o))
        b_max = max(b_max, 1.0)
        rho = lam * w / 1e3
        # step time at the offered load, then the adapters active within one request's life
        # (their LoRA blocks feed back into the step time: one refinement is enough)
        active = min(g, float(n))
        c0_sat, t_est = _step_ms(c_const, c_eager_const, c_lconst, per_adapter, active,
                                 b_max, w, o, rho)
        life_s = o * t_est / 1e3
        active = 0.0
        for j in range(s, e):
            active += 1.0 - math.exp(-rates[j] * life_s)
        c0_sat, t_est = _step_ms(c_const, c_eager_const, c_lconst, per_adapter,
                                 min(active, g), b_max, w, o, rho)
        cap_rps = 1e3 * b_max / (o * c0_sat + b_max * w)
        # The LoRA admission rule: an adapter leaves the slot set only when it has no running
        # request, which for Poisson traffic happens at rate q exp(-q life). Adapters that are
        # practically never idle lock their slots; the others wait for a slot to turn over.
        life_s = o * t_est / 1e3
        locking = 0.0
        for j in range(s, e):
            if rates[j] * life_s > _LOCKED:
                locking += 1.0
        turnover = 0.0
        for q in top:
            turnover += q * math.exp(-q * life_s)
        waiting = max(active - g, 0.0)
        row[25] = t_est
        row[26] = min(lam * o * t_est / 1e3, b_max)
        row[27] = active
        row[28] = active / g
        row[29] = cap_rps
        row[30] = cap_rps * (p + o)
        row[31] = lam / cap_rps
        row[32] = rho
        row[33] = locking / g
        row[34] = turnover
        row[35] = min(waiting / max(turnover, 1e-6), _MAX_WAIT_S)
        # unqueued first token: the prompt's chunks share each step's budget with the decodes
        row[36] = t_est * (1.5 + p / max(budget - row[26], _MIN_CHUNK))
        row[37] = CAP_NEVER_S  # an unbounded client; _cap_columns fills capped loads
        row[38] = CAP_NEVER_S


class FeatureBuilder:
    """Builds feature matrices for one profile; memoises the few per-config profile lookups."""

    def __init__(self, profile: Profile) -> None:
        sm = profile.serving().step_model  # the twin's steps, serving-path contention included
        self.profile = profile
        self._coef = np.array([float(getattr(sm, name, 0.0)) for name in _STEP_COEFS])
        self._kv: dict[tuple[int, int, bool], float] = {}
        self._lengths: dict[LengthModel, tuple[float, float, float, float]] = {}

    def _kv_tokens(self, config: EngineConfig) -> float:
        key = (config.max_loras, config.max_lora_rank, config.enable_lora)
        kv = self._kv.get(key)
        if kv is None:
            kv = self._kv[key] = float(self.profile.kv_tokens(config))
        return kv

    def _length_stats(self, lengths: LengthModel) -> tuple[float, float, float, float]:
        """(mean prompt, mean output, prompt CV, output CV): exact means, sampled spreads."""
        stats = self._lengths.get(lengths)
        if stats is None:
            p, o = lengths.sample(np.random.default_rng(0x5EED), _LENGTH_SAMPLE)
            stats = self._lengths[lengths] = (
                lengths.mean_prompt(),
                lengths.mean_output(),
                float(np.std(p) / max(np.mean(p), 1e-9)),
                float(np.std(o) / max(np.mean(o), 1e-9)),
            )
        return stats

    def __call__(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> np.ndarray:
        """float64 matrix, one row per (load, config), columns FEATURE_NAMES."""
        n_loads = len(loads)
        if n_loads != len(configs):
            raise ValueError(f"loads ({n_loads}) and configs ({len(configs)}) differ in length")
        # a batch repeats a few config and length-model objects thousands of times: their
        # scalars are looked up once per object (by identity: they live through this call)
        by_cfg: dict[int, tuple[float, ...]] = {}
        by_lengths: dict[int, tuple[float, ...]] = {}
        rows = []
        for load, cfg in zip(loads, configs, strict=True):
            c = by_cfg.get(id(cfg))
            if c is None:
                c = by_cfg[id(cfg)] = (
                    cfg.max_loras, cfg.max_lora_rank, cfg.max_num_seqs,
                    cfg.max_num_batched_tokens, cfg.cpu_slots, self._kv_tokens(cfg),
                )
            lengths = by_lengths.get(id(load.lengths))
            if lengths is None:
                lengths = by_lengths[id(load.lengths)] = self._length_stats(load.lengths)
            rows.append(c + lengths)
        scal = np.array(rows, dtype=np.float64).reshape(n_loads, len(_SCALARS))
        offsets = np.zeros(n_loads + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ld.rates_rps) for ld in loads])
        if n_loads == 1:
            rates, ranks = loads[0].rates_rps, loads[0].ranks
        else:
            rates = np.concatenate([ld.rates_rps for ld in loads])
            ranks = np.concatenate([ld.ranks for ld in loads])
        out = np.empty((n_loads, N_FEATURES))
        _kernel(offsets, rates, ranks, scal, self._coef, out)
        _cap_columns(loads, out)
        return out


def _cap_columns(loads: Sequence[ReplicaLoad], out: np.ndarray) -> None:
    """The client-cap features (module docstring) of capped loads; the kernel wrote "never"."""
    capped = [i for i, ld in enumerate(loads) if ld.client_max_inflight is not None]
    if not capped:
        return
    cap = np.array([loads[i].client_max_inflight for i in capped], dtype=np.float64)
    rate = out[capped, FEATURE_NAMES.index("total_rate_rps")]
    excess = rate - out[capped, FEATURE_NAMES.index("capacity_rps")]
    out[capped, _N_KERNEL] = np.where(rate > 0, cap / np.maximum(rate, 1e-12), CAP_NEVER_S)
    out[capped, _N_KERNEL + 1] = np.where(
        excess > 0, cap / np.maximum(excess, 1e-12), CAP_NEVER_S
    )


def build_features(
    loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig], profile: Profile
) -> np.ndarray:
    """The feature matrix (columns FEATURE_NAMES) the surrogate trains and predicts on."""
    return FeatureBuilder(profile)(loads, configs)
