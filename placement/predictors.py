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

PREDICTORS: tuple[str, ...] = ("surrogate", "analytic", "twin")
DEFAULT_PREDICTOR = "surrogate"
DEFAULT_TWIN_WINDOW_S = 300.0
# DomainGuard: twin runs one call may need for rows outside the surrogate's domain before the
# workload itself counts as outside (an error saying so), and the runs it remembers
MAX_TWIN_RUNS_PER_CALL = 32
TWIN_CACHE = 4096


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
    outside are predicted by ``twin`` (one run per distinct (load, config), remembered) and
    counted by the feature that put them outside. More than ``MAX_TWIN_RUNS_PER_CALL`` new ones
    in one call means the workload itself is outside: a PlacementError names the feature, its
    value and range, and what to do. ``domain_report()`` says what the twin judged (the planner
    records it with the plan, so it is never silent)."""

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

    def predict_columns(self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
                        ) -> dict[str, np.ndarray]:
        x = self.surrogate.features(loads, configs)
        out = self.surrogate.predict_arrays(x)
        bad = np.flatnonzero(self.surrogate.outside(x))
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
            self._runs[keys[i]] = self.twin.predict_one(loads[i], configs[i])
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

    def predict(self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
                ) -> list[dict[str, float]]:
        cols = self.predict_columns(loads, configs)
        return [{k: (bool(cols[k][i]) if k == "starved" else float(cols[k][i]))
                 for k in PREDICTED_METRICS} for i in range(len(loads))]

    def domain_report(self, reset: bool = True) -> dict[str, Any]:
        """What the twin judged since the last reset: twin runs by the feature outside the
        domain, and how many predictions they answered (cached runs answer again)."""
        report = {"twin_runs": sum(self._why.values()), "predictions": self._judged,
                  "outside": dict(self._why)}
        if reset:
            self._why.clear()
            self._judged = 0
        return report


def _key(load: ReplicaLoad, config: EngineConfig) -> tuple:
    return (load.adapter_ids, load.ranks.tobytes(), load.rates_rps.tobytes(),
            repr(load.lengths), load.client_max_inflight, config)
