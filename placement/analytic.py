"""A closed-form ``ReplicaPredictor`` built from the profile's own step-time model.

Cheap (all (load, config) pairs of a call are evaluated together in numpy) and monotone, so it is
useful for tests, for quick what-ifs and as a fallback the user selects explicitly
(``--predictor analytic``). It is rough: queueing and the LoRA admission rule are approximated
in closed form, so final plans should still be verified by the twin (``lorafleet plan`` does,
unless ``--no-verify``).

The model, per replica, with mean prompt P and output D tokens per request:

* a request occupies a running slot for about D steps, so at N running requests a step holds N
  decode rows and N*P/D prefill tokens and attends N*(P + D/2) context tokens;
* running requests are bounded by ``max_num_seqs``, the token budget (N*(1+P/D) <= budget), the
  KV cache (N*(P + D/2) <= ``kv_utilisation`` x KV tokens: contexts vary, and a full cache
  preempts by recompute, which the twin shows costing ~15 % of throughput on long-prompt
  traces) and the LoRA slots: requests in flight of adapter i are
  ~Poisson(p_i N) (p_i its share of the rate), so N running requests span
  a(N) = sum_i 1 - exp(-p_i N) distinct adapters; the scheduler only admits adapters that fit in
  ``max_loras`` slots and skips the others; once a(N) nears the slots, waiting adapters queue for
  tens of seconds and in-batch evictions multiply the adapter loads (seen in the twin from
  a(N) ~ 0.75 x max_loras, collapsing near 1), so with more adapters than slots N is capped
  where a(N) reaches ``slot_pressure`` x max_loras (0.65: on a 144-point grid of twin runs, no
  config this model calls feasible starved in the twin; it is conservative elsewhere);
* the step time comes from ``profile.step_model`` at that batch (distinct adapters = min(a(N),
  max_loras)); adapter loads add their measured latency per miss, the miss fraction from Che's
  approximation of an LRU of ``max_loras`` (GPU) and ``max_cpu_loras`` (CPU) entries;
* capacity = N_max / (D x step time) requests/s; throughput = min(offered, capacity); starved
  when throughput < 90 % of offered (the twin's rule); TTFT adds an M/M/1-like queueing term.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twin.config import EngineConfig
from twin.latency import design_matrix
from twin.metrics import STARVATION_THRESHOLD
from twin.profile import Profile
from twin.replica import ReplicaLoad

# Concurrency grid on which a(N) is tabulated (inverted by interpolation).
_N_GRID = np.concatenate([[0.0], np.geomspace(0.05, 2.0e5, 160)])
_MAX_RHO = 0.999
_CACHE_ENTRIES = 4096
_LADDER = np.linspace(0.0, 1.0, 24)  # running-request ladder, log-spaced from 1 to the max


@dataclass(frozen=True)
class AnalyticPredictor:
    """Closed-form replica model (module docstring); implements ``ReplicaPredictor``."""

    profile: Profile
    slot_pressure: float = 0.65
    kv_utilisation: float = 0.7
    name: str = "analytic"
    # per-instance memo of share tables and KV sizes (pure functions of their keys)
    _cache: dict[tuple[Any, ...], Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def predict(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> list[dict[str, float]]:
        if len(loads) != len(configs):
            raise ValueError(f"loads ({len(loads)}) and configs ({len(configs)}) differ in length")
        if not loads:
            return []
        cols = self._columns(loads, configs)
        keys = ("total_throughput_tps", "offered_total_tps", "ttft_p50_ms", "ttft_p99_ms",
                "itl_p50_ms", "itl_p99_ms", "starved")
        rows = np.column_stack([cols[k] for k in keys]).tolist()
        return [
            {k: (bool(v) if k == "starved" else float(v)) for k, v in zip(keys, row, strict=True)}
            for row in rows
        ]

    def capacity_tps(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> np.ndarray:
        """Tokens/s each replica completes at saturation (for diagnostics and tests)."""
        return self._columns(loads, configs)["capacity_tps"]

    # -----------------------------------------------------------------------------------------
    def _columns(  # noqa: PLR0915 - one vectorised pass, kept together
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> dict[str, np.ndarray]:
        prof = self.profile
        # unique loads: a policy pairs one load with many candidate configs
        index: dict[int, int] = {}
        uniq: list[ReplicaLoad] = []
        u_of = np.empty(len(loads), dtype=np.int64)
        for k, load in enumerate(loads):
            u = index.get(id(load))
            if u is None:
                u = index[id(load)] = len(uniq)
                uniq.append(load)
            u_of[k] = u
        lam_u = np.array([ld.total_rate_rps for ld in uniq])
        means = [(ld.lengths.mean_prompt(), ld.lengths.mean_output()) for ld in uniq]
        P_u = np.array([m[0] for m in means])
        D_u = np.maximum(np.array([m[1] for m in means]), 1.0)
        n_act_u = np.array([int(np.count_nonzero(ld.rates_rps > 0)) for ld in uniq], dtype=float)

        sizes = np.array([ld.n_adapters for ld in uniq])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rates = np.concatenate([ld.rates_rps for ld in uniq])
        share = rates / np.repeat(np.where(lam_u > 0, lam_u, 1.0), sizes)
        ranks_all = np.concatenate([ld.ranks for ld in uniq])
        a_tab, da_tab = self._tables(share, sizes, offsets)

        n = len(loads)
        G = np.array([c.max_loras for c in configs], dtype=float)
        R = np.array([c.max_lora_rank for c in configs], dtype=float)
        S = np.array([c.max_num_seqs for c in configs], dtype=float)
        B = np.array([c.max_num_batched_tokens for c in configs], dtype=float)
        C_cpu = np.array([c.cpu_slots for c in configs], dtype=float)
        blocks = np.array([c.block_size for c in configs], dtype=float)
        kv = np.empty(n)
        for k, c in enumerate(configs):
            key = ("kv", c.max_loras, c.max_lora_rank, c.enable_lora)
            if key not in self._cache:
                self._remember(key, max(prof.kv_tokens(c), 0))
            kv[k] = self._cache[key]
        gpu_ms, disk_ms = self._load_latencies(uniq, sizes, offsets, ranks_all, share, u_of, R)

        lam, P, D, n_act = lam_u[u_of], P_u[u_of], D_u[u_of], n_act_u[u_of]

        def a_of(N: np.ndarray, pair: np.ndarray) -> np.ndarray:
            return _interp_rows(N, a_tab, u_of[pair])

        def inverse_a(target: np.ndarray, slots: np.ndarray) -> np.ndarray:
            """N with a(N) = target where the load has more adapters than ``slots`` (else inf)."""
            out = np.full(n, np.inf)
            ok = (n_act > slots) & (n_act > target)
            if ok.any():
                out[ok] = _inverse_rows(target[ok], a_tab[u_of[ok]])
            return out

        n_kv = self.kv_utilisation * kv / (P + D / 2.0 + blocks / 2.0)
        n_budget = B * D / (D + P)
        n_slot = inverse_a(self.slot_pressure * G, G)
        n_max = np.maximum(np.minimum.reduce([S, n_kv, n_budget, n_slot]), 1.0)
        steps = prof.serving().step_model  # the twin's steps, serving-path contention included
        coef = steps.as_vector()

        def step_ms(N: np.ndarray, prefill: np.ndarray, pair: np.ndarray) -> np.ndarray:
            """Step time of rows (N running, ``prefill`` prompt tokens) of the given pairs."""
            X = design_matrix(
                prefill_tokens=np.round(prefill),
                decode_seqs=np.round(N),
                ctx_tokens=N * (P[pair] + D[pair] / 2.0),
                lora_adapters=np.minimum(
                    np.minimum(a_of(N, pair), G[pair]), np.maximum(n_act[pair], 1)
                ),
                lora_enabled=1.0,
                max_lora_rank=R[pair],
                max_loras=G[pair],
                cuda_graph_max_tokens=steps.cuda_graph_max_tokens,
            )
            return np.maximum(X @ coef, 1e-3)

        # adapter-load misses per request (Che's approximation of each LRU)
        da_rows = u_of
        miss_gpu = np.where(n_act > G, _interp_rows(inverse_a(G, G), da_tab, da_rows), 0.0)
        miss_cpu = np.where(
            n_act > C_cpu, _interp_rows(inverse_a(C_cpu, C_cpu), da_tab, da_rows), 0.0
        )
        load_ms = miss_gpu * gpu_ms + miss_cpu * disk_ms  # per request

        # one step-model evaluation: saturation row + a ladder of N per pair
        pairs = np.arange(n)
        ladder = np.exp(np.outer(np.log(n_max), _LADDER))  # n x K, from 1 to n_max
        rows_pair = np.concatenate([pairs, np.repeat(pairs, _LADDER.size)])
        rows_N = np.concatenate([n_max, ladder.ravel()])
        tau_all = step_ms(rows_N, rows_N * P[rows_pair] / D[rows_pair], rows_pair)
        tau_sat = tau_all[:n]
        tau_ladder = tau_all[n:].reshape(n, _LADDER.size)

        mu_sat = 1000.0 / (D * tau_sat / n_max + load_ms)  # requests/s at saturation
        tokens_per_req = P + D
        capacity = mu_sat * tokens_per_req
        offered = lam * tokens_per_req
        throughput = np.minimum(offered, capacity)
        starved = throughput < STARVATION_THRESHOLD * offered
        rho = np.where(capacity > 0, offered / capacity, np.inf)

        # running requests at the offered load: the first crossing of N = lam * D * step(N)
        excess = (lam * D)[:, None] * tau_ladder / 1000.0 - ladder
        below = excess <= 0
        j = np.where(below.any(axis=1), below.argmax(axis=1), _LADDER.size - 1)
        jm = np.maximum(j - 1, 0)
        e0, e1 = excess[pairs, jm], excess[pairs, j]
        frac = np.where((j > 0) & (e0 != e1), e0 / np.where(e0 != e1, e0 - e1, 1.0), 0.0)
        N = ladder[pairs, jm] + np.clip(frac, 0.0, 1.0) * (ladder[pairs, j] - ladder[pairs, jm])
        N = np.where(rho < 1.0, np.clip(N, 1.0, n_max), n_max)
        tau = _interp_ladder(N, ladder, tau_ladder)
        r = np.minimum(rho, _MAX_RHO)
        wait = tau * r / (1.0 - r)
        ttft_p50 = 1.5 * tau + wait * np.log(2.0)
        ttft_p99 = 2.5 * tau + wait * np.log(100.0)
        big_prefill = np.minimum(np.maximum(B - N, 0.0), 4.0 * P)
        itl_p99 = step_ms(N, big_prefill, pairs)
        return {
            "total_throughput_tps": throughput,
            "offered_total_tps": offered,
            "ttft_p50_ms": ttft_p50,
            "ttft_p99_ms": ttft_p99,
            "itl_p50_ms": tau,
            "itl_p99_ms": np.maximum(itl_p99, tau),
            "starved": starved.astype(float),
            "capacity_tps": capacity,
        }

    def _tables(
        self, share: np.ndarray, sizes: np.ndarray, offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """a(N) and a'(N) on the N grid for each load's rate shares.

        They depend only on the shares, which searches that scale one load's rates keep fixed,
        so they are cached by a digest of the shares.
        """
        keys = [
            ("a", hashlib.blake2b(share[o : o + z].tobytes(), digest_size=16).digest())
            for o, z in zip(offsets.tolist(), sizes.tolist(), strict=True)
        ]
        todo = [u for u, key in enumerate(keys) if key not in self._cache]
        if todo:
            parts = [share[offsets[u] : offsets[u] + sizes[u]] for u in todo]
            sub = np.concatenate(parts)
            sub_off = np.concatenate([[0], np.cumsum([len(q) for q in parts])[:-1]])
            e = np.exp(-np.outer(sub, _N_GRID))  # adapters x grid
            a = np.add.reduceat(1.0 - e, sub_off, axis=0)
            da = np.add.reduceat(sub[:, None] * e, sub_off, axis=0)
            fresh = {keys[u]: (a[k], da[k]) for k, u in enumerate(todo)}
        else:
            fresh = {}
        rows = [fresh[key] if key in fresh else self._cache[key] for key in keys]
        for key, value in fresh.items():
            self._remember(key, value)
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])

    def _remember(self, key: tuple[Any, ...], value: Any) -> None:
        if len(self._cache) >= _CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = value

    def _load_latencies(
        self,
        uniq: list[ReplicaLoad],
        sizes: np.ndarray,
        offsets: np.ndarray,
        ranks_all: np.ndarray,
        share: np.ndarray,
        u_of: np.ndarray,
        R: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Share-weighted CPU->GPU and disk->CPU load latency (ms) of each pair's adapters."""
        table = self.profile.adapter_loads
        distinct = np.unique(ranks_all)
        # per unique load: share of traffic per adapter rank
        by_rank = np.zeros((len(uniq), len(distinct)))
        pos = np.searchsorted(distinct, ranks_all)
        owner = np.repeat(np.arange(len(uniq)), sizes)
        np.add.at(by_rank, (owner, pos), share)
        disk_per_rank = np.array([table.disk_load_ms(int(r)) for r in distinct])
        disk = by_rank[u_of] @ disk_per_rank
        gpu = np.empty(len(u_of))
        for slot_rank in np.unique(R):
            sel = slot_rank == R
            ms = np.array([table.gpu_load_ms(int(slot_rank), int(r)) for r in distinct])
            gpu[sel] = by_rank[u_of[sel]] @ ms
        return gpu, disk


def _interp_rows(x: np.ndarray, table: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``table[row[k]]`` (tabulated on ``_N_GRID``) at x[k], clamped."""
    x = np.clip(x, _N_GRID[0], _N_GRID[-1])
    j = np.clip(np.searchsorted(_N_GRID, x, side="right") - 1, 0, len(_N_GRID) - 2)
    x0, x1 = _N_GRID[j], _N_GRID[j + 1]
    y0, y1 = table[row, j], table[row, j + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _interp_ladder(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Row-wise linear interpolation of ys (on increasing xs, one row per x), clamped."""
    k = xs.shape[1]
    j = np.clip((xs < x[:, None]).sum(axis=1), 1, k - 1)
    rows = np.arange(len(x))
    x0, x1, y0, y1 = xs[rows, j - 1], xs[rows, j], ys[rows, j - 1], ys[rows, j]
    t = np.clip((x - x0) / np.where(x1 > x0, x1 - x0, 1.0), 0.0, 1.0)
    return y0 + t * (y1 - y0)


def _inverse_rows(y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x on ``_N_GRID`` with rows(x) = y, for increasing rows (linear between grid points)."""
    j = np.clip((rows < y[:, None]).sum(axis=1), 1, len(_N_GRID) - 1)
    idx = np.arange(len(y))
    y0, y1 = rows[idx, j - 1], rows[idx, j]
    frac = np.where(y1 > y0, (y - y0) / np.where(y1 > y0, y1 - y0, 1.0), 1.0)
    return _N_GRID[j - 1] + np.clip(frac, 0.0, 1.0) * (_N_GRID[j] - _N_GRID[j - 1])
