"""Which ``ReplicaPredictor`` placement runs on, chosen explicitly (no silent fallback).

* ``surrogate`` (default): the LightGBM surrogate trained on twin runs (``twin.surrogate``),
  microseconds per prediction. Missing models are an error naming the directory and the command
  that trains them.
* ``analytic``: ``placement.analytic.AnalyticPredictor``, closed form from the profile's step
  model; rough and conservative, always available.
* ``twin``: full twin runs of ``twin_window_s`` simulated seconds per prediction; exact but
  ~0.05-1 s each, so only for small workloads.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from placement.errors import PlacementError
from twin.profile import Profile
from twin.replica import ReplicaPredictor, TwinPredictor

PREDICTORS: tuple[str, ...] = ("surrogate", "analytic", "twin")
DEFAULT_PREDICTOR = "surrogate"
DEFAULT_TWIN_WINDOW_S = 300.0


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
        return _load_surrogate(profile_ref if profile_ref is not None else profile.name)
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
