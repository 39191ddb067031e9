"""Which ``ReplicaPredictor`` placement runs on, chosen explicitly (no silent fallback).

* ``surrogate`` (default): the LightGBM surrogate trained on twin runs (``twin.surrogate``),
  microseconds per prediction, behind ``DomainGuard``: a candidate replica whose inputs lie
  outside what the surrogate was trained on is judged by the twin instead, counted, and reported
  with the plan; a workload mostly outside is an error that names the feature and what to do.
  Missing models are an error naming the directory and the command that trains them.
* ``analytic``: ``placement.analytic.AnalyticPredictor``, closed form from the profile's step
  model; rough and conservative, always available.
* ``twin``: full twin runs of ``twin_window_s`` simulated seconds per prediction; exact but
  ~0.05-1 s each, so only for small workloads.
"""

from __future__ import annotations

import importlib
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from placement.errors import PlacementError
from twin.config import EngineConfig
from twin.profile import Profile
from twin.replica import PREDICTED_METRICS, ReplicaLoad, ReplicaPredictor, TwinPredictor
from twin.surrogate_features import FEATURE_NAMES

PREDICTORS: tuple[str, ...] = ("surrogate", "analytic", "twin")
DEFAULT_PREDICTOR = "surrogate"
DEFAULT_TWIN_WINDOW_S = 300.0
# DomainGuard: twin runs one call may need for rows outside the surrogate's domain before the
# workload itself counts as outside (an error saying so), and the runs it remembers
MAX_TWIN_RUNS_PER_CALL = 32
TWIN_CACHE = 4096
# A replica the surrogate calls short of served (not starved, under the feasibility threshold)
# at under this share of its analytic capacity ("load_ratio") is read as the no-queue figure
# instead: so lightly loaded nothing queues, and what a twin run misses of the offered tokens is
# only the requests still in flight when its window closes (one request life out of the window).
# The trees are a few per cent low there for requests of a thousand tokens and for replicas of
# hundreds of adapters (issue #17: one adapter of 1,232-token answers read 95 % served at 0.1 %
# of capacity, so it was never split and no plan was found; the twin served 99.7 %).
LIGHT_LOAD_RATIO = 0.5
# A twin run counts only requests completed inside its window, so one judging a row outside the
# domain must be long against a request's life, or a light load of long requests reads as
# starved (a 300-s run served 86 % of a 1 % sliver of 1,232-token answers): at least this many
# lifetimes, at most MAX_JUDGE_S.
TAIL_LIFETIMES = 50.0
MAX_JUDGE_S = 7200.0
TRAINING_WINDOW_S = 3600.0  # the simulated seconds of a training run (meta.yaml window_s)
_I_LOAD_RATIO = FEATURE_NAMES.index("load_ratio")
_I_TTFT_LIGHT = FEATURE_NAMES.index("ttft_light_est_ms")
_I_MEAN_OUTPUT = FEATURE_NAMES.index("mean_output")
_I_STEP_MS = FEATURE_NAMES.index("step_ms_est")


def make_predictor(
    name: str,
    profile: Profile,
    *,
    profile_ref: str | Path | None = None,
    twin_window_s: float = DEFAULT_TWIN_WINDOW_S,
    seed: int = 0,
) -> ReplicaPredictor:
    """The predictor called ``name`` for ``profile`` (``profile_ref``: the name or path the user
    gave, where the surrogate's models are looked up; default the profile's name)."""
    if name == "analytic":
        from placement.analytic import AnalyticPredictor

        return AnalyticPredictor(profile)
    if name == "twin":
        return TwinPredictor(profile, duration_s=twin_window_s, seed=seed)
    if name == "surrogate":
        model = _load_surrogate(profile_ref if profile_ref is not None else profile.name)
        return DomainGuard(model, TwinPredictor(profile, duration_s=twin_window_s, seed=seed))
    raise PlacementError(f"predictor: unknown predictor {name!r}; known: {', '.join(PREDICTORS)}")


def _load_surrogate(profile_ref: str | Path) -> ReplicaPredictor:
    try:
        module = importlib.import_module("twin.surrogate")
    except ModuleNotFoundError as exc:
        if exc.name != "twin.surrogate":
            raise
        raise PlacementError(
            "predictor surrogate: this lorafleet has no surrogate module (twin/surrogate.py); "
            "choose --predictor analytic (closed form, rough) or twin (exact, slow)"
        ) from None
    error = getattr(module, "SurrogateError", ())
    try:
        return module.load_surrogate(profile_ref)
    except error as exc:  # its message names the models' directory and the training command
        raise PlacementError(f"predictor surrogate: {exc}") from None
    except FileNotFoundError as exc:
        raise PlacementError(
            f"predictor surrogate: {exc}; train it with "
            f"`lorafleet surrogate train --profile {profile_ref}`"
        ) from None


class DomainGuard:
    """The surrogate where its training design reaches, the twin where it does not.

    Every batch is checked against the planning trees' domain (``Surrogate.outside``): rows
    outside are predicted by ``twin`` (one run per distinct (load, config), remembered, long
    enough against the requests' life) and counted by the feature that put them outside;
    rows the trees call short of served at a light load (``LIGHT_LOAD_RATIO``) read the
    no-queue figure instead, and are counted too. More than
    ``MAX_TWIN_RUNS_PER_CALL`` new rows outside in one call means the workload itself is
    outside: a PlacementError names the feature, its value and range, and what to do.
    ``domain_report()`` says what the twin judged (the planner records it with the plan, so it
    is never silent)."""

    name = "surrogate"
    # A plan's feasibility threshold with this predictor (PlacementContext.for_profile): the
    # trees' not-starved throughput is ~2 % off the twin on held-out runs (5 % on the wide
    # design) and read a lightly loaded single-adapter replica of ShareGPT-like requests at
    # 98.3 % served where the twin serves all of it; 0.99 called such replicas infeasible.
    min_served_fraction = 0.97

    def __init__(self, surrogate: Any, twin: TwinPredictor) -> None:
        self.surrogate = surrogate
        self.twin = twin
        # the planner offers replicas no more slots than the trees were trained on
        # (PlacementContext.max_loras_limit): beyond, every candidate would be a twin run
        self.max_loras_limit = surrogate.max_loras_trained()
        self._runs: OrderedDict[tuple, dict[str, float]] = OrderedDict()
        self._why: Counter[str] = Counter()
        self._judged = 0
        self._light = 0

    def predict_columns(self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
                        ) -> dict[str, np.ndarray]:
        x = self.surrogate.features(loads, configs)
        out = self.surrogate.predict_arrays(x)
        outside = self.surrogate.outside(x)
        light = np.flatnonzero(~outside & self._short_at_light_load(x, out))
        if light.size:
            self._light += int(light.size)
            offered = out["offered_total_tps"]
            for i in light.tolist():
                out["total_throughput_tps"][i] = offered[i] * self._no_queue_fraction(x[i])
        bad = np.flatnonzero(outside)
        if bad.size == 0:
            return out
        keys = {i: _key(loads[i], configs[i]) for i in bad.tolist()}
        new = [i for i, k in keys.items() if k not in self._runs]
        if len(new) > MAX_TWIN_RUNS_PER_CALL:
            why = self.surrogate.domain_.why(x[new[0]])
            raise PlacementError(
                f"predictor surrogate: {len(new)} of {len(loads)} candidate replicas lie outside "
                f"the surrogate's training domain ({why}); it would only guess there. Plan with "
                "--predictor twin (exact, slow) or analytic (fast, rough), or widen the design: "
                f"`lorafleet surrogate train --profile {self.twin.profile.name} --data "
                "profiles/NAME.surrogate/samples.csv.gz --wide-samples N`")
        for i in new:
            self._runs[keys[i]] = self.twin.predict_one(loads[i], configs[i],
                                                        duration_s=self._window(x[i]))
            self._why[self.surrogate.domain_.why(x[i]).split(" = ")[0]] += 1
            while len(self._runs) > TWIN_CACHE:
                self._runs.popitem(last=False)
        self._judged += len(bad)
        for i, k in keys.items():
            m = self._runs[k]
            self._runs.move_to_end(k)
            for name in PREDICTED_METRICS:
                out[name][i] = m[name]
        return out

    def _short_at_light_load(self, x: np.ndarray, out: dict[str, np.ndarray]) -> np.ndarray:
        """Rows the trees call short of served (not starved, but under the feasibility
        threshold) at under ``LIGHT_LOAD_RATIO`` of the replica's analytic capacity."""
        offered = out["offered_total_tps"]
        short = out["total_throughput_tps"] < self.min_served_fraction * offered
        return (~out["starved"].astype(bool) & short & (offered > 0)
                & (x[:, _I_LOAD_RATIO] < LIGHT_LOAD_RATIO))

    @staticmethod
    def _life_s(row: np.ndarray) -> float:
        """One request's life at a light load: the analytic TTFT plus the mean answer at the
        analytic step time."""
        return float(row[_I_TTFT_LIGHT] + row[_I_MEAN_OUTPUT] * row[_I_STEP_MS]) / 1e3

    def _no_queue_fraction(self, row: np.ndarray) -> float:
        """The offered tokens a run of the trees' training window completes when nothing
        queues: all but the requests in flight when it closes (one life out of the window)."""
        return max(0.0, 1.0 - self._life_s(row) / TRAINING_WINDOW_S)

    def _window(self, row: np.ndarray) -> float:
        """Simulated seconds of a twin run judging a row outside the domain: ``TAIL_LIFETIMES``
        request lives, at least the twin's own window, at most ``MAX_JUDGE_S``."""
        base = float(getattr(self.twin, "duration_s", 0.0))
        return float(min(MAX_JUDGE_S, max(base, TAIL_LIFETIMES * self._life_s(row))))

    def predict(self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
                ) -> list[dict[str, float]]:
        cols = self.predict_columns(loads, configs)
        return [{k: (bool(cols[k][i]) if k == "starved" else float(cols[k][i]))
                 for k in PREDICTED_METRICS} for i in range(len(loads))]

    def domain_report(self, reset: bool = True) -> dict[str, Any]:
        """What the twin judged since the last reset: twin runs by the feature outside the
        domain, and how many predictions they answered (cached runs answer again); and how
        many light-load rows read the no-queue figure (``light_load``)."""
        report = {"twin_runs": sum(self._why.values()), "predictions": self._judged,
                  "outside": dict(self._why), "light_load": self._light}
        if reset:
            self._why.clear()
            self._judged = 0
            self._light = 0
        return report


def _key(load: ReplicaLoad, config: EngineConfig) -> tuple:
    return (load.adapter_ids, load.ranks.tobytes(), load.rates_rps.tobytes(),
            repr(load.lengths), load.client_max_inflight, config)
