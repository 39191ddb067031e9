"""LightGBM surrogate of one replica: the twin's answer in microseconds, for placement's inner loop.

``Surrogate`` follows scikit-learn's conventions (hyperparameters in ``__init__``, ``fit``
returns self, fitted state in ``*_`` attributes) and implements ``twin.replica.ReplicaPredictor``.
It predicts, for a (ReplicaLoad, EngineConfig), the replica's completed throughput (by default
in log space relative to min(offered, analytic capacity), which stays physical beyond the trained
load range), starvation (a classifier, or the predicted completed fraction below 90 %), and
TTFT / ITL p50 and p99 (log space), from ``twin.surrogate_features``. ``train_surrogate`` picks
the throughput target and starvation mode by cross-validation; docs/surrogate.md has the numbers.

Speed: ``lightgbm.Booster.predict`` costs ~100 us per call and model, so the fitted trees are
re-laid as complete trees in flat arrays and walked by one compiled kernel for all models at once
(``predict_arrays``); the boosters stay the source of truth (saved as LightGBM text models,
checked against the kernel in the tests).

Models live next to their profile: ``profiles/NAME.yaml`` -> ``profiles/NAME.surrogate/`` (one
LightGBM text model per target, ``meta.yaml``, and the twin runs they were trained on).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from numba import njit, prange

from twin.calibrate import smape
from twin.client_cap import cap_equivalent_loads
from twin.config import EngineConfig
from twin.metrics import STARVATION_THRESHOLD
from twin.profile import Profile, ProfileError, load_profile, profile_dirs
from twin.replica import PREDICTED_METRICS, ReplicaLoad
from twin.surrogate_features import CAP_NEVER_S, FEATURE_NAMES, FeatureBuilder

META_FORMAT_VERSION = 1
LATENCY_TARGETS: tuple[str, ...] = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
THROUGHPUT_TARGETS: tuple[str, ...] = ("fraction", "log_fraction", "log", "log_vs_capacity")
# the targets as ``_finish`` receives them (their index)
_T_FRACTION, _T_LOG_FRACTION, _T_LOG, _T_LOG_VS_CAPACITY = range(len(THROUGHPUT_TARGETS))
STARVATION_MODES: tuple[str, ...] = ("classifier", "fraction")
_I_OFFERED = FEATURE_NAMES.index("offered_tps")
_I_CAPACITY = FEATURE_NAMES.index("capacity_tps")
_I_CAP = FEATURE_NAMES.index("client_cap_s")
CAPPED_DIR = "capped"  # the ensemble for loads behind a client's cap, inside the directory
_MIN_FRACTION = 1e-4  # floor of the completed fraction in log space (a replica that serves ~0)
if PREDICTED_METRICS[2:6] != LATENCY_TARGETS or PREDICTED_METRICS[6] != "starved":
    raise ImportError("twin.surrogate._finish writes PREDICTED_METRICS by position; its order "
                      "changed")


class SurrogateError(ValueError):
    """A surrogate that is missing, stale or asked for something it cannot do."""


# The inputs the training design spans (twin.surrogate_data): a replica whose values fall
# outside what the trees were fitted on is outside the surrogate's domain, and its figures are
# guesses. Load (rates, offered / capacity) is not among them: the targets are normalised by the
# analytic capacity so they stay physical beyond the trained load range (docs/surrogate.md).
DOMAIN_FEATURES: tuple[str, ...] = (
    "n_adapters", "mean_prompt", "mean_output", "prompt_cv", "output_cv", "max_loras",
    "max_lora_rank", "max_num_seqs", "max_num_batched_tokens",
)
DOMAIN_SLACK = 0.02  # relative slack around the trained range (rounding, sampled means)
_I_DOMAIN = np.array([FEATURE_NAMES.index(f) for f in DOMAIN_FEATURES])


@dataclass(frozen=True)
class Domain:
    """The trained range of each of ``DOMAIN_FEATURES`` (what ``outside`` checks rows against)."""

    low: np.ndarray
    high: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Domain:
        sub = np.asarray(x, float)[:, _I_DOMAIN]
        return cls(sub.min(axis=0), sub.max(axis=0))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Domain:
        return cls(np.array([float(d[f][0]) for f in DOMAIN_FEATURES]),
                   np.array([float(d[f][1]) for f in DOMAIN_FEATURES]))

    def to_dict(self) -> dict[str, list[float]]:
        return {f: [float(lo), float(hi)] for f, lo, hi in
                zip(DOMAIN_FEATURES, self.low, self.high, strict=True)}

    def outside(self, x: np.ndarray) -> np.ndarray:
        """(rows, DOMAIN_FEATURES) booleans: the value lies outside the trained range."""
        sub = np.asarray(x, float)[:, _I_DOMAIN]
        lo = self.low - DOMAIN_SLACK * np.abs(self.low)
        hi = self.high + DOMAIN_SLACK * np.abs(self.high)
        return (sub < lo) | (sub > hi)

    def why(self, x_row: np.ndarray) -> str:
        """The first feature of one row outside the range, in words."""
        bad = self.outside(np.asarray(x_row, float)[None, :])[0]
        for k in np.flatnonzero(bad):
            v = float(np.asarray(x_row, float)[_I_DOMAIN[k]])
            return (f"{DOMAIN_FEATURES[k]} = {v:.4g} outside the trained "
                    f"[{self.low[k]:.4g}, {self.high[k]:.4g}]")
        return "inside the trained ranges"


# ------------------------------------------------------------------------------ the trees


_ROW_BLOCK = 16  # rows walked together: independent walks overlap their memory latencies
PARALLEL_ROWS = 64  # from this many rows on, blocks of rows are spread over the cores


@njit(cache=True)
def _walk_forest(x, feat, thr, leaf, tree_model, depth, out):
    """out[i, m] = raw score of model m on row i: the sum of its trees' leaves.

    Trees are stored complete (heap order, ``depth`` levels; a leaf above the last level is
    repeated below splits that always go left), so every walk is ``depth`` branch-free steps
    ``node = 2 node + 1 + (x > threshold)`` (LightGBM's ``x <= threshold`` goes left).
    """
    out[:] = 0.0
    first_leaf = (1 << depth) - 1
    for i in range(x.shape[0]):
        for t in range(feat.shape[0]):
            k = 0
            for _ in range(depth):
                k = 2 * k + 1 + (x[i, feat[t, k]] > thr[t, k])
            out[i, tree_model[t]] += leaf[t, k - first_leaf]


@njit(cache=True, parallel=True)
def _walk_forest_blocks(x, feat, thr, leaf, tree_model, depth, out):
    """``_walk_forest`` for batches: blocks of rows in parallel, each block walked level by
    level across its rows so their dependent loads overlap."""
    out[:] = 0.0
    first_leaf = (1 << depth) - 1
    n = x.shape[0]
    n_blocks = (n + _ROW_BLOCK - 1) // _ROW_BLOCK
    for b in prange(n_blocks):
        i0 = b * _ROW_BLOCK
        nb = min(_ROW_BLOCK, n - i0)
        nodes = np.zeros(_ROW_BLOCK, np.int64)
        for t in range(feat.shape[0]):
            nodes[:] = 0
            for _ in range(depth):
                for r in range(nb):
                    k = nodes[r]
                    nodes[r] = 2 * k + 1 + (x[i0 + r, feat[t, k]] > thr[t, k])
            for r in range(nb):
                out[i0 + r, tree_model[t]] += leaf[t, nodes[r] - first_leaf]


MAX_FOREST_DEPTH = 10  # deeper trees would make the complete layout too large: use LightGBM


@dataclass(frozen=True)
class _Forest:
    """All trees of several boosters as complete trees in flat arrays (see ``_walk_forest``)."""

    feat: np.ndarray  # int64 (trees, 2^depth - 1)
    thr: np.ndarray  # float64 (trees, 2^depth - 1); +inf on padding splits
    leaf: np.ndarray  # float64 (trees, 2^depth)
    tree_model: np.ndarray  # int64 (trees,)
    depth: int
    n_models: int

    @classmethod
    def from_boosters(cls, boosters: Sequence[Any]) -> _Forest | None:
        """The compiled layout, or None when a tree has what it does not model (categorical or
        missing-value splits, depth > MAX_FOREST_DEPTH): LightGBM then predicts."""
        trees = [(m, t["tree_structure"]) for m, b in enumerate(boosters)
                 for t in b.dump_model()["tree_info"]]

        def depth_of(node: dict[str, Any]) -> int:
            if "leaf_value" in node:
                return 0
            return 1 + max(depth_of(node["left_child"]), depth_of(node["right_child"]))

        depth = max([depth_of(t) for _, t in trees] + [1])
        if depth > MAX_FOREST_DEPTH:
            return None
        n_split, n_leaf = (1 << depth) - 1, 1 << depth
        feat = np.zeros((len(trees), n_split), np.int64)
        thr = np.full((len(trees), n_split), np.inf)
        leaf = np.zeros((len(trees), n_leaf))

        def fill(t: int, node: dict[str, Any], pos: int, level: int) -> bool:
            if "leaf_value" in node:
                span = 1 << (depth - level)
                first = (pos - ((1 << level) - 1)) * span
                leaf[t, first:first + span] = node["leaf_value"]
                return True
            if node.get("decision_type", "<=") != "<=" or node.get("missing_type") != "None":
                return False
            feat[t, pos] = int(node["split_feature"])
            thr[t, pos] = float(node["threshold"])
            return fill(t, node["left_child"], 2 * pos + 1, level + 1) and fill(
                t, node["right_child"], 2 * pos + 2, level + 1)

        if not all(fill(t, tree, 0, 0) for t, (_, tree) in enumerate(trees)):
            return None
        return cls(feat=feat, thr=thr, leaf=leaf,
                   tree_model=np.array([m for m, _ in trees], np.int64), depth=depth,
                   n_models=len(boosters))

    @property
    def n_trees(self) -> int:
        return int(self.feat.shape[0])

    def raw(self, x: np.ndarray) -> np.ndarray:
        if np.isnan(x).any():  # LightGBM reads NaN as 0 on splits without missing values
            x = np.where(np.isnan(x), 0.0, x)
        out = np.empty((x.shape[0], self.n_models))
        walk = _walk_forest_blocks if x.shape[0] >= PARALLEL_ROWS else _walk_forest
        walk(x, self.feat, self.thr, self.leaf, self.tree_model, self.depth, out)
        return out


# ------------------------------------------------------------------------------ the model


def completed_fraction(y: pd.DataFrame) -> np.ndarray:
    """Completed / offered tokens of each twin run (what starvation is judged on)."""
    offered = y["offered_total_tps"].to_numpy(float)
    done = y["total_throughput_tps"].to_numpy(float)
    return np.where(offered > 0, done / np.maximum(offered, 1e-12), 1.0)


@njit(cache=True)
def _servable_row(x, r):  # pragma: no cover - compiled
    """What the analytic estimate says row ``r``'s replica completes: min(offered, capacity)
    tok/s (the scale of the ``log_vs_capacity`` target, in fitting and in ``_finish``)."""
    return max(min(x[r, _I_OFFERED], x[r, _I_CAPACITY]), 1e-6)


@njit(cache=True)
def _servable(x):  # pragma: no cover - compiled
    """``_servable_row`` of every row."""
    out = np.empty(x.shape[0])
    for r in range(x.shape[0]):
        out[r] = _servable_row(x, r)
    return out


@njit(cache=True)
def _finish(raw, x, target, classifier, threshold, out):  # pragma: no cover - compiled
    """Tree sums -> PREDICTED_METRICS columns, one fused pass (numpy ops cost ~9 us on one row).

    ``target``: index in THROUGHPUT_TARGETS; the completed fraction is read from the throughput
    model as that target defines it and capped at 1. Starved: the classifier's probability >
    0.5, or the fraction below ``threshold``; nothing offered is never starved (as the twin).
    """
    last = raw.shape[1] - 1
    for r in range(raw.shape[0]):
        offered = x[r, _I_OFFERED]
        y = raw[r, 0]
        if target == _T_FRACTION:
            frac = min(max(y, 0.0), 1.0)
        elif target == _T_LOG_FRACTION:
            frac = min(math.exp(y), 1.0)
        else:  # log, log_vs_capacity: tok/s, relative to the analytic servable rate or not
            scale = _servable_row(x, r) if target == _T_LOG_VS_CAPACITY else 1.0
            frac = min(math.exp(y) * scale / max(offered, 1e-12), 1.0)
        out[r, 0] = frac * offered
        out[r, 1] = offered
        for j in range(4):  # LATENCY_TARGETS, in log space
            out[r, 2 + j] = math.exp(raw[r, 1 + j])
        starved = raw[r, last] > 0.0 if classifier else frac < threshold
        out[r, 6] = 1.0 if starved and offered > 0 else 0.0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class Surrogate:
    """LightGBM models of one profile's replica; a ``ReplicaPredictor`` named "surrogate".

    Two ensembles, chosen per row by the load's client: one fitted on the uncapped design for a
    load with an unbounded client (every replica of a plan), and ``capped_``, fitted on every
    design (``twin.surrogate_data.DESIGNS``), for a load behind an in-flight cap (measurements
    made through such a client). Keeping the first apart keeps the capped runs from costing the
    planning model accuracy (Llama held-out throughput 8.8 % alone, 10.3 % fitted with the
    capped runs).
    """

    name = "surrogate"

    def __init__(
        self,
        profile: Profile,
        *,
        n_estimators: int = 100,
        learning_rate: float = 0.1,
        num_leaves: int = 31,
        max_depth: int = 6,
        min_child_samples: int = 10,
        throughput_target: str = "log_vs_capacity",
        starvation: str = "classifier",
        seed: int = 0,
        num_threads: int = 2,
    ) -> None:
        if throughput_target not in THROUGHPUT_TARGETS:
            raise SurrogateError(
                f"throughput_target: one of {list(THROUGHPUT_TARGETS)}, got {throughput_target!r}"
            )
        if starvation not in STARVATION_MODES:
            raise SurrogateError(
                f"starvation: one of {list(STARVATION_MODES)}, got {starvation!r}"
            )
        self.profile = profile
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.max_depth = max_depth
        self.min_child_samples = min_child_samples
        self.throughput_target = throughput_target
        self.starvation = starvation
        self.seed = seed
        self.num_threads = num_threads
        self._builder = FeatureBuilder(profile)
        self.capped_: Surrogate | None = None
        self.capped_design = False  # fitted on runs behind a client's cap too
        self.domain_: Domain | None = None  # the trained range of DOMAIN_FEATURES

    # -- fitting ---------------------------------------------------------------------------

    @property
    def model_names(self) -> tuple[str, ...]:
        """Boosters in forest order: throughput, the four latencies, then the classifier."""
        tail = ("starved",) if self.starvation == "classifier" else ()
        return ("throughput", *LATENCY_TARGETS, *tail)

    def _params(self, objective: str) -> dict[str, Any]:
        return {
            "objective": objective,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "max_depth": self.max_depth,
            "min_data_in_leaf": self.min_child_samples,
            "feature_fraction": 0.9,
            "bagging_fraction": 0.9,
            "bagging_freq": 1,
            "seed": self.seed,
            "deterministic": True,
            "num_threads": self.num_threads,
            "verbose": -1,
        }

    def _throughput_y(self, x: np.ndarray, y: pd.DataFrame) -> np.ndarray:
        frac = completed_fraction(y)
        if self.throughput_target == "fraction":
            return frac
        if self.throughput_target == "log_fraction":
            return np.log(np.maximum(frac, _MIN_FRACTION))
        done = np.maximum(y["total_throughput_tps"].to_numpy(float), 1e-6)
        if self.throughput_target == "log_vs_capacity":
            return np.log(done / _servable(x))
        return np.log(done)

    def fit(self, X: pd.DataFrame, Y: pd.DataFrame) -> Surrogate:  # noqa: N803 - sklearn names
        """Fit every model on twin runs: X has FEATURE_NAMES, Y the PREDICTED_METRICS columns."""
        import lightgbm as lgb

        missing = [c for c in FEATURE_NAMES if c not in X.columns]
        missing += [c for c in PREDICTED_METRICS if c not in Y.columns]
        if missing:
            raise SurrogateError(f"fit: missing column(s) {missing}")
        x = X.loc[:, list(FEATURE_NAMES)].to_numpy(float)
        targets: dict[str, tuple[np.ndarray, str]] = {
            "throughput": (self._throughput_y(x, Y), "regression"),
            **{k: (np.log(Y[k].to_numpy(float)), "regression") for k in LATENCY_TARGETS},
        }
        if self.starvation == "classifier":
            targets["starved"] = (Y["starved"].to_numpy(bool).astype(float), "binary")
        boosters = []
        for name in self.model_names:
            y, objective = targets[name]
            ok = np.isfinite(y)
            data = lgb.Dataset(x[ok], y[ok], feature_name=list(FEATURE_NAMES),
                               free_raw_data=True)
            boosters.append(lgb.train(self._params(objective), data,
                                      num_boost_round=self.n_estimators))
        self._set_boosters(boosters)
        self.n_train_ = int(len(x))
        self.capped_design = bool((x[:, _I_CAP] < CAP_NEVER_S).any())
        self.domain_ = Domain.of(x)
        return self

    def _set_boosters(self, boosters: list[Any]) -> None:
        self.boosters_ = dict(zip(self.model_names, boosters, strict=True))
        self.forest_ = _Forest.from_boosters(boosters)

    # -- prediction ------------------------------------------------------------------------

    def raw_scores(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """(n, models) raw tree sums, by the compiled walk (LightGBM's own predict for a
        model without its flattened forest)."""
        x = np.ascontiguousarray(X, dtype=np.float64)
        if self.forest_ is not None:
            return self.forest_.raw(x)
        return np.column_stack(
            [self.boosters_[m].predict(x, raw_score=True) for m in self.model_names]
        )

    def predict_arrays(self, X: np.ndarray) -> dict[str, np.ndarray]:  # noqa: N803
        """PREDICTED_METRICS as arrays for a feature matrix (columns FEATURE_NAMES); rows
        behind a client's cap go to ``capped_``."""
        x = np.asarray(X, float)
        if self.capped_design or (len(x) == 1 and x[0, _I_CAP] >= CAP_NEVER_S):
            return self._predict_own(x)  # (one row checked without an array: placement's case)
        behind = x[:, _I_CAP] < CAP_NEVER_S
        if not behind.any():
            return self._predict_own(x)
        if self.capped_ is None:
            raise SurrogateError(
                "a load behind a client's in-flight cap, but this surrogate was trained without "
                "capped runs; retrain with `lorafleet surrogate train --capped-samples N`"
            )
        if behind.all():
            return self.capped_._predict_own(x)
        own, capped = self._predict_own(x[~behind]), self.capped_._predict_own(x[behind])
        out = {k: np.empty(len(x), dtype=v.dtype) for k, v in own.items()}
        for k, v in out.items():
            v[~behind], v[behind] = own[k], capped[k]
        return out

    def _predict_own(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """This ensemble's predictions for every row of ``x``."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        raw = self.raw_scores(x)
        out = np.empty((len(x), len(PREDICTED_METRICS)))
        _finish(raw, x, THROUGHPUT_TARGETS.index(self.throughput_target),
                self.starvation == "classifier", STARVATION_THRESHOLD, out)
        cols = {k: out[:, j] for j, k in enumerate(PREDICTED_METRICS)}
        cols["starved"] = cols["starved"] > 0.0
        return cols

    def starvation_probability(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """P(starved) from the classifier (only in classifier mode; unbounded clients)."""
        if self.starvation != "classifier":
            raise SurrogateError("starvation_probability: this surrogate has no classifier")
        return _sigmoid(self.raw_scores(X)[:, -1])

    def features(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> np.ndarray:
        return self._builder(loads, configs)

    def predict_columns(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> dict[str, np.ndarray]:
        """PREDICTED_METRICS as arrays for (load, config) pairs: the batch form placement's
        searches judge feasibility on (``twin.replica.predict_columns``), no dict per row."""
        return self.predict_arrays(self._builder(loads, configs))

    def max_loras_trained(self) -> int | None:
        """The largest ``max_loras`` of the training design (None without a domain)."""
        if self.domain_ is None:
            return None
        return int(self.domain_.high[DOMAIN_FEATURES.index("max_loras")])

    def outside(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """Per row: a load without a client cap (a plan's replica) whose design inputs lie
        outside what the planning trees were trained on (``Domain``); capped rows are read by
        the capped set and not checked. A model saved without its domain refuses."""
        x = np.asarray(X, float)
        if self.domain_ is None:
            raise SurrogateError("this surrogate was saved without its training domain; retrain "
                                 f"it with `lorafleet surrogate train --profile "
                                 f"{self.profile.name}`")
        return self.domain_.outside(x).any(axis=1) & (x[:, _I_CAP] >= CAP_NEVER_S)

    def predict(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> list[dict[str, float]]:
        """ReplicaPredictor: one dict of PREDICTED_METRICS per (load, config)."""
        arrays = self.predict_columns(loads, configs)
        columns = [arrays[k].tolist() for k in PREDICTED_METRICS]
        return [dict(zip(PREDICTED_METRICS, row, strict=True)) for row in zip(*columns,
                                                                                strict=True)]

    # -- persistence -----------------------------------------------------------------------

    def save(self, directory: str | Path, extra_meta: dict[str, Any] | None = None) -> Path:
        """LightGBM text models + meta.yaml into ``directory`` (created)."""
        import lightgbm as lgb

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, booster in self.boosters_.items():
            files[name] = f"{name}.txt"
            booster.save_model(str(directory / files[name]))
        meta = {
            "format_version": META_FORMAT_VERSION,
            "profile": self.profile.name,
            "features": list(FEATURE_NAMES),
            "models": files,
            "throughput_target": self.throughput_target,
            "starvation": self.starvation,
            "params": {
                "n_estimators": self.n_estimators,
                "learning_rate": self.learning_rate,
                "num_leaves": self.num_leaves,
                "max_depth": self.max_depth,
                "min_child_samples": self.min_child_samples,
                "seed": self.seed,
            },
            "n_train": self.n_train_,
            "capped_design": self.capped_design,
            "domain": self.domain_.to_dict() if self.domain_ is not None else None,
            "lightgbm_version": lgb.__version__,
            **(extra_meta or {}),
        }
        if self.capped_ is not None:
            self.capped_.save(directory / CAPPED_DIR, {
                "design": "uncapped and capped",
                "selection": getattr(self.capped_, "selection_", None),
            })
            meta["capped"] = CAPPED_DIR
        self.meta_ = _plain(meta)
        (directory / "meta.yaml").write_text(yaml.safe_dump(self.meta_, sort_keys=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path, profile: Profile | None = None) -> Surrogate:
        """A saved surrogate; its profile by the name in meta.yaml unless given."""
        import lightgbm as lgb

        directory = Path(directory)
        meta_path = directory / "meta.yaml"
        if not meta_path.exists():
            raise SurrogateError(f"{meta_path}: not found; not a surrogate directory")
        meta = yaml.safe_load(meta_path.read_text())
        if meta.get("format_version") != META_FORMAT_VERSION:
            raise SurrogateError(f"{meta_path}: format_version {meta.get('format_version')} "
                                 f"is not {META_FORMAT_VERSION}; retrain it")
        if tuple(meta.get("features", ())) != FEATURE_NAMES:
            raise SurrogateError(
                f"{meta_path}: trained on other features than this lorafleet builds; retrain "
                f"with `lorafleet surrogate train --profile {meta.get('profile')}`"
            )
        profile = profile if profile is not None else load_profile(meta["profile"])
        params = meta.get("params", {})
        model = cls(profile, throughput_target=meta["throughput_target"],
                    starvation=meta["starvation"], **params)
        boosters = [lgb.Booster(model_file=str(directory / meta["models"][name]))
                    for name in model.model_names]
        model._set_boosters(boosters)
        model.n_train_ = int(meta.get("n_train", 0))
        model.capped_design = bool(meta.get("capped_design", False))
        if meta.get("domain"):
            model.domain_ = Domain.from_dict(meta["domain"])
        model.meta_ = meta
        if meta.get("capped"):
            model.capped_ = cls.load(directory / meta["capped"], profile)
        return model


def _plain(obj: Any) -> Any:
    """YAML-safe copy (numpy scalars -> Python, NaN -> None)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------ where models live


def surrogate_dir(profile_ref: str | Path) -> Path:
    """``profiles/NAME.surrogate`` next to the profile's YAML (by name or by path)."""
    candidate = Path(profile_ref)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate.with_suffix(".surrogate")
    for d in profile_dirs():
        if (d / f"{profile_ref}.yaml").exists():
            return d / f"{profile_ref}.surrogate"
    raise ProfileError(f"no profile named {str(profile_ref)!r} (searched "
                       f"{[str(d) for d in profile_dirs()]})")


def load_surrogate(profile_ref: str | Path) -> Surrogate:
    """The shipped/trained surrogate of a profile, or an error naming the directory and command."""
    directory = surrogate_dir(profile_ref)
    if not (directory / "meta.yaml").exists():
        raise SurrogateError(
            f"no surrogate for profile {str(profile_ref)!r}: {directory} does not exist or has "
            f"no meta.yaml; create it with `lorafleet surrogate train --profile {profile_ref}`"
        )
    return Surrogate.load(directory, load_profile(profile_ref))


# ------------------------------------------------------------------------------ scoring


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over the classes present in truth or prediction (scikit-learn's macro F1)."""
    y_true = np.asarray(y_true, bool)
    y_pred = np.asarray(y_pred, bool)
    scores = []
    for c in (False, True):
        tp = int(np.sum((y_true == c) & (y_pred == c)))
        fp = int(np.sum((y_true != c) & (y_pred == c)))
        fn = int(np.sum((y_true == c) & (y_pred != c)))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def score(pred: dict[str, np.ndarray], truth: pd.DataFrame) -> dict[str, Any]:
    """SMAPE per regression metric (all rows, and not-starved rows) and starvation macro-F1."""
    starved = truth["starved"].to_numpy(bool)
    out: dict[str, Any] = {}
    for k in ("total_throughput_tps", *LATENCY_TARGETS):
        y = truth[k].to_numpy(float)
        p = np.asarray(pred[k], float)
        ok = np.isfinite(y) & np.isfinite(p)
        calm = ok & ~starved
        out[k] = {
            "smape": _r(smape(y[ok], p[ok])) if ok.any() else None, "n": int(ok.sum()),
            "smape_not_starved": _r(smape(y[calm], p[calm])) if calm.any() else None,
            "n_not_starved": int(calm.sum()),
        }
    out["starvation_macro_f1"] = _r(macro_f1(starved, pred["starved"]), 4)
    return out


def _r(x: float, nd: int = 3) -> float | None:
    return round(float(x), nd) if x is not None and math.isfinite(x) else None


def time_predictions(
    model: Surrogate, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig],
    repeats: int = 7,
) -> dict[str, float]:
    """Median wall times: one ``predict`` call (µs, averaged over the given mix of loads), a
    batch of 1,000 through ``predict_arrays`` (ms, trees only) and through ``predict`` (ms,
    features included)."""
    pairs = list(zip(loads, configs, strict=True))
    batch_loads = [loads[i % len(loads)] for i in range(1000)]
    batch_cfgs = [configs[i % len(configs)] for i in range(1000)]
    x = model.features(batch_loads, batch_cfgs)
    model.predict(batch_loads[:2], batch_cfgs[:2])  # compile / warm

    def one_by_one() -> None:
        for load, cfg in pairs:
            model.predict([load], [cfg])

    def median_s(fn: Any, per_repeat: int, calls: int = 1) -> float:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            runs.append((time.perf_counter() - t0) / (per_repeat * calls))
        return float(np.median(runs))

    return {
        "predict_us_single": round(median_s(one_by_one, len(pairs)) * 1e6, 2),
        "predict_ms_batch_1000": round(
            median_s(lambda: model.predict_arrays(x), 1, calls=20) * 1e3, 3
        ),
        "predict_ms_batch_1000_with_features": round(
            median_s(lambda: model.predict(batch_loads, batch_cfgs), 1, calls=5) * 1e3, 3
        ),
    }


# ------------------------------------------------------------------------------ train / eval

SAMPLES_FILE = "samples.csv.gz"
HELD_OUT_FRACTION = 0.2


def held_out_mask(n: int, seed: int, fraction: float = HELD_OUT_FRACTION) -> np.ndarray:
    """Seeded random held-out rows (True = held out)."""
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[: int(round(n * fraction))]] = True
    return mask


def capped_rows(table: pd.DataFrame) -> np.ndarray:
    """Rows of a capped design (a client with an in-flight cap)."""
    from twin.surrogate_data import DESIGNS, table_designs

    return np.array([DESIGNS[d].capped for d in table_designs(table)], dtype=bool)


def design_held_out(table: pd.DataFrame, seed: int) -> np.ndarray:
    """Held-out rows drawn within each design on its own (seed + its stream), so adding runs of
    one design leaves the split of the others — and their held-out figures — as they were."""
    from twin.surrogate_data import DESIGNS, table_designs

    designs = table_designs(table)
    mask = np.zeros(len(table), bool)
    for name, part in DESIGNS.items():
        idx = np.flatnonzero(designs == name)
        mask[idx] = held_out_mask(len(idx), seed + part.stream)
    return mask


def _xy(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return table.loc[:, list(FEATURE_NAMES)], table.loc[:, list(PREDICTED_METRICS)]


# Throughput targets that stay physical beyond the trained load range (a constant fraction of
# the offered load would grow without bound on a more overloaded replica).
EXTRAPOLATING_TARGETS: tuple[str, ...] = ("log_vs_capacity", "log")


SELECTION_FOLDS = 4


def select_modes(
    table: pd.DataFrame, profile: Profile, seed: int,
    candidates: Sequence[str] = EXTRAPOLATING_TARGETS, **params: Any,
) -> dict[str, Any]:
    """Throughput target and starvation mode with the best out-of-fold scores of a k-fold split
    of the training rows (the held-out rows stay untouched for the reported accuracy)."""
    fold = np.random.default_rng(seed + 1).permutation(len(table)) % SELECTION_FOLDS
    x, y = _xy(table)
    starved = y["starved"].to_numpy(bool)
    scores: dict[str, Any] = {}
    f1: dict[str, dict[str, float]] = {}
    for target in candidates:
        thr = np.empty(len(table))
        clf = np.empty(len(table), bool)
        for k in range(SELECTION_FOLDS):
            train, val = fold != k, fold == k
            model = Surrogate(profile, throughput_target=target, starvation="classifier",
                              seed=seed, **params).fit(x[train], y[train])
            pred = model._predict_own(x[val].to_numpy(float))  # one ensemble, any client
            thr[val], clf[val] = pred["total_throughput_tps"], pred["starved"]
        frac = thr / np.maximum(x["offered_tps"].to_numpy(float), 1e-12)
        f1[target] = {"classifier": macro_f1(starved, clf),
                      "fraction": macro_f1(starved, frac < STARVATION_THRESHOLD)}
        scores[target] = {
            "throughput_smape": _r(smape(y["total_throughput_tps"].to_numpy(float), thr)),
            **{m: _r(v, 4) for m, v in f1[target].items()},
        }
    target = min(candidates, key=lambda t: scores[t]["throughput_smape"])
    mode = max(STARVATION_MODES, key=lambda m: f1[target][m])
    return {"throughput_target": target, "starvation": mode, "validation": scores}


def read_samples(path: str | Path, profile: Profile, split: str | None = None) -> pd.DataFrame:
    """A stored twin-run table (only its ``split`` rows if given) with its features recomputed
    by this lorafleet."""
    from twin.surrogate_data import SampleSpec, featurize, table_designs

    table = pd.read_csv(path)
    if split is not None:
        table = table[table["split"] == split].reset_index(drop=True)
    specs = [SampleSpec.from_row(r) for r in table.to_dict("records")]
    if "spec_client_max_inflight" not in table:  # a table from before the capped design
        table["spec_client_max_inflight"] = 0
    table[list(FEATURE_NAMES)] = featurize(specs, profile)
    table["starved"] = table["starved"].astype(bool)
    table["design"] = table_designs(table)
    return table


def _fit_selected(
    train: pd.DataFrame, profile: Profile, seed: int, params: dict[str, Any]
) -> Surrogate:
    """Modes chosen by cross-validation on ``train``, then fitted on all of it."""
    modes = select_modes(train, profile, seed, **params)
    model = Surrogate(profile, throughput_target=modes["throughput_target"],
                      starvation=modes["starvation"], seed=seed, **params)
    model.fit(*_xy(train))
    model.selection_ = modes["validation"]
    return model


def train_surrogate(
    profile_ref: str,
    *,
    samples: int = 2000,
    capped_samples: int = 4000,
    capped_light_samples: int = 1000,
    wide_samples: int = 2000,
    workers: int = 2,
    seed: int = 0,
    out: str | Path | None = None,
    data: str | Path | None = None,
    duration_s: float = 3600.0,
    progress: bool = False,
    **params: Any,
) -> dict[str, Any]:
    """Generate twin runs (or reuse ``data``), fit, score on held-out runs, save; the meta.

    ``capped_samples`` / ``capped_light_samples`` / ``wide_samples``: runs of the ``capped`` /
    ``capped_light`` / ``wide`` designs (``twin.surrogate_data.DESIGNS``) in the table; those a
    reused ``data`` table lacks are run and appended. The planning trees are fitted on the
    uncapped designs (``uncapped`` and ``wide``), and their domain is what those span.
    """
    from twin.surrogate_data import run_samples, sample_space

    profile = load_profile(profile_ref)
    directory = Path(out) if out is not None else surrogate_dir(profile_ref)
    t0 = time.perf_counter()
    if data is not None:
        table = read_samples(data, profile)
        duration_s = float(table["spec_duration_s"].iloc[0])
        provenance = _data_provenance(Path(data))
    else:
        provenance = {"twin_commit": _git_commit(), "twin_workers": workers}
        specs = sample_space(samples, profile, seed=seed, duration_s=duration_s)
        table = run_samples(specs, profile, duration_s=duration_s, workers=workers,
                            progress=progress).assign(design="uncapped")
        provenance["twin_runs_wall_s"] = round(time.perf_counter() - t0, 1)
    for design, wanted in (("capped", capped_samples), ("capped_light", capped_light_samples),
                           ("wide", wide_samples)):
        have = int((table["design"] == design).sum())
        if wanted <= have:
            continue
        t1 = time.perf_counter()
        specs = sample_space(wanted, profile, seed=seed, duration_s=duration_s,
                             design=design)[have:]
        extra = run_samples(specs, profile, duration_s=duration_s, workers=workers,
                            progress=progress).assign(design=design)
        table = pd.concat([table.drop(columns=["split"], errors="ignore"), extra],
                          ignore_index=True)
        provenance[f"{design}_runs_wall_s"] = round(time.perf_counter() - t1, 1)
        provenance[f"{design}_twin_commit"] = _git_commit()
    t_twin = time.perf_counter() - t0
    held = design_held_out(table, seed)
    capped = capped_rows(table)
    model = _fit_selected(table[~held & ~capped].reset_index(drop=True), profile, seed, params)
    if (capped & ~held).any():
        model.capped_ = _fit_selected(table[~held].reset_index(drop=True), profile, seed, params)
    t_fit = time.perf_counter() - t0 - t_twin
    meta = {
        "n_samples": int(len(table)),
        "n_capped": int(capped.sum()),
        "n_capped_light": int((table["design"] == "capped_light").sum()),
        "n_wide": int((table["design"] == "wide").sum()),
        "n_held_out": int((held & ~capped).sum()),
        "n_held_out_capped": int((held & capped).sum()),
        "seed": seed,
        "window_s": duration_s,
        **provenance,
        "twin_runs_cpu_s": round(float(table["twin_wall_s"].sum()), 1),
        "fit_wall_s": round(t_fit, 1),
        "data": SAMPLES_FILE,
        "selection": model.selection_,
        **held_out_scores(model, table[held]),
    }
    model.save(directory, meta)
    table.assign(split=np.where(held, "held_out", "train")).to_csv(
        directory / SAMPLES_FILE, index=False
    )
    return {"directory": str(directory), **model.meta_}


HELD_OUT_KEYS = {  # report key of each design's held-out scores
    "uncapped": "held_out", "capped": "held_out_capped_design",
    "capped_light": "held_out_capped_light", "wide": "held_out_wide",
}


def held_out_scores(model: Surrogate, held: pd.DataFrame) -> dict[str, Any]:
    """``score`` on each design's held-out rows (None for a design without any)."""
    out: dict[str, Any] = {}
    for design, key in HELD_OUT_KEYS.items():
        rows = held[held["design"].to_numpy(str) == design]
        x, y = _xy(rows)
        out[key] = score(model.predict_arrays(x.to_numpy(float)), y) if len(rows) else None
    return out


_PROVENANCE_KEYS = ("twin_runs_wall_s", "twin_workers", "twin_commit", "capped_runs_wall_s",
                    "capped_twin_commit", "capped_light_runs_wall_s", "capped_light_twin_commit",
                    "wide_runs_wall_s", "wide_twin_commit")


def _data_provenance(data: Path) -> dict[str, Any]:
    """How reused twin runs were made: from the meta.yaml next to them (None where unknown)."""
    meta_path = data.parent / "meta.yaml"
    meta = yaml.safe_load(meta_path.read_text()) if meta_path.exists() else {}
    return {k: (meta or {}).get(k) for k in _PROVENANCE_KEYS}


def _git_commit() -> str | None:
    """The repository commit the twin runs came from (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _real_run_cap_bound(row: pd.Series) -> bool | None:
    """Whether the run's load generator cap was reached (None when the table cannot tell)."""
    from twin.validate import REFERENCE_CLIENT_MAX_INFLIGHT, run_client_cap

    cap = run_client_cap(row, REFERENCE_CLIENT_MAX_INFLIGHT)
    if cap is None:
        return False
    cols = ("prom_max_num_waiting", "prom_max_num_running")
    if not all(c in row.index and np.isfinite(float(row[c])) for c in cols):
        return None
    return bool(row[cols[0]] + row[cols[1]] >= 0.9 * cap)


REAL_LATENCY_COLUMNS = {
    "ttft_p50_ms": "ttft_median_ms", "ttft_p99_ms": "ttft_p99_ms",
    "itl_p50_ms": "itl_median_ms", "itl_p99_ms": "itl_p99_ms",
}


def evaluate_real_runs(
    model: Surrogate, runs_path: str | Path, seed: int = 0
) -> tuple[dict[str, Any], list[ReplicaLoad], list[EngineConfig]]:
    """Surrogate vs measured runs of this profile's model (rebuilt exactly as ``validate``).

    Throughput is predicted for the load the run's capped client really put on the replica
    (``twin.client_cap``; ``..._uncapped_client`` keeps the offered load); starvation and
    latencies for the offered load, against which the runs' verdicts are defined.
    """
    from twin.validate import (
        REFERENCE_CLIENT_MAX_INFLIGHT,
        REFERENCE_EOS_OUTPUT_SCALE,
        load_runs,
        measured_starved,
        run_client_cap,
        run_seed,
        run_workload,
    )

    runs = load_runs(runs_path)
    runs = runs[runs["model"] == model.profile.name].reset_index(drop=True)
    loads, configs, windows = [], [], []
    for _, row in runs.iterrows():
        workload, config = run_workload(row, run_seed(row, seed), REFERENCE_EOS_OUTPUT_SCALE)
        loads.append(ReplicaLoad.from_workload(workload))
        configs.append(config)
        windows.append(workload.duration_s)
    out: dict[str, Any] = {"n_runs": int(len(runs))}
    if not len(runs):
        out.update({"total_throughput_tps": {"smape": None, "n": 0},
                    "starvation_macro_f1": None})
        return out, loads, configs
    measured = runs["total_throughput_tps"].to_numpy(float)
    starved = np.array([measured_starved(r) for _, r in runs.iterrows()])
    bound = np.array([_real_run_cap_bound(r) for _, r in runs.iterrows()], dtype=object)
    caps = [run_client_cap(r, REFERENCE_CLIENT_MAX_INFLIGHT) for _, r in runs.iterrows()]
    uncapped = model.predict_arrays(model.features(loads, configs))
    capped_loads = [replace(ld, client_max_inflight=c) for ld, c in zip(loads, caps, strict=True)]
    behind = model.predict_arrays(model.features(capped_loads, configs))
    equivalent = cap_equivalent_loads(
        loads, caps, windows,
        lambda ls: model.predict_arrays(model.features(ls, configs))["total_throughput_tps"],
    )
    thr_eq = model.predict_arrays(model.features(equivalent, configs))["total_throughput_tps"]
    by_feature = model.capped_ is not None
    pred = behind if by_feature else uncapped
    thr = behind["total_throughput_tps"] if by_feature else thr_eq
    out["throughput_behind_cap"] = "cap feature" if by_feature else "equivalent load"
    out["total_throughput_tps"] = {"smape": _r(smape(measured, thr)), "n": int(len(runs))}
    out["total_throughput_tps_equivalent_load"] = {
        "smape": _r(smape(measured, thr_eq)), "n": int(len(runs)),
    }
    out["total_throughput_tps_uncapped_client"] = {
        "smape": _r(smape(measured, uncapped["total_throughput_tps"])), "n": int(len(runs)),
    }
    reached = np.array([b is True for b in bound])
    free = np.array([b is False for b in bound])
    for key, rows in (("cap_reached", reached), ("cap_not_reached", free)):
        out[f"total_throughput_tps_{key}"] = {
            "smape": _r(smape(measured[rows], thr[rows])) if rows.any() else None,
            "n": int(rows.sum()),
        }
    out["starvation_macro_f1"] = _r(macro_f1(starved, pred["starved"]), 4)
    out["starvation_macro_f1_uncapped_client"] = _r(macro_f1(starved, uncapped["starved"]), 4)
    out["starvation_accuracy"] = _r(float(np.mean(starved == pred["starved"])), 4)
    for k, col in REAL_LATENCY_COLUMNS.items():
        y = runs[col].to_numpy(float) if col in runs.columns else np.full(len(runs), np.nan)
        ok = np.isfinite(y) & ~starved
        out[f"{k}_not_starved"] = {
            "smape": _r(smape(y[ok], pred[k][ok])) if ok.any() else None, "n": int(ok.sum()),
        }
    return out, loads, configs


def evaluate_surrogate(
    profile_ref: str,
    runs: str | Path | None,
    *,
    directory: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out twin runs, real runs and speed of a trained surrogate (the `eval` report)."""
    from twin.surrogate_data import SampleSpec, length_menu

    if directory is None:
        model, directory = load_surrogate(profile_ref), surrogate_dir(profile_ref)
    else:
        model, directory = Surrogate.load(directory, load_profile(profile_ref)), Path(directory)
    held_all = read_samples(directory / model.meta_.get("data", SAMPLES_FILE), model.profile,
                            split="held_out")
    held = held_all[~capped_rows(held_all)]
    report: dict[str, Any] = {
        "profile": model.profile.name,
        "n_train": model.n_train_,
        **{k: v for k, v in held_out_scores(model, held_all).items() if v is not None},
    }
    if runs is not None:
        report["real_runs"], _, _ = evaluate_real_runs(model, runs, seed)
    menu = {name: lm for name, lm, _ in length_menu(model.profile.max_model_len)}
    pairs = [SampleSpec.from_row(r).build(menu) for r in held.head(200).to_dict("records")]
    report.update(time_predictions(model, [p[0] for p in pairs], [p[1] for p in pairs]))
    report["n_trees"] = sum(b.num_trees() for b in model.boosters_.values())
    return report
