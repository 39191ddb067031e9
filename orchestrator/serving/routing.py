"""Request routing: adapter id -> (replica group, copy). Pure Python, no Ray.

The plan's routing table says which groups serve an adapter and with what weight (a hot adapter
is split over its own group and a shared one); every copy of a group holds the same adapters. So
a request is routed in two steps:

1. pick a group by the plan's weights (a seeded ``random.Random``: reproducible in tests);
2. among that group's copies pick the one with the fewest requests in flight (ties: the copy
   used least recently), which is what keeps replicated groups balanced under bursts.

The base model name goes to any group (every replica serves its base model), least-loaded over
all copies. A request whose replica failed is retried by the same rule with that replica left
out (``route(..., exclude=...)``), once (``may_retry``). Load is what the caller reports (the
ingress counts its own in-flight requests per copy); the table itself holds no mutable state
besides the tie-break counter.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.serving.backend import UnknownModel

MAX_ATTEMPTS = 2  # replicas one request is tried on when the first one fails


@dataclass(frozen=True, order=True)
class ReplicaId:
    """A replica: its group and its copy index (0-based). Shown as ``group/copy``."""

    group: str
    copy: int

    def __str__(self) -> str:
        return f"{self.group}/{self.copy}"

    @property
    def deployment(self) -> str:
        """The Ray Serve deployment name of this copy (one deployment per copy)."""
        return f"engine-{self.group}-{self.copy}"


@dataclass(frozen=True)
class _Choice:
    groups: tuple[str, ...]
    cumulative: tuple[float, ...]


@dataclass
class RoutingTable:
    """Weighted groups per adapter + copies per group (``from_plan`` or built by hand)."""

    routes: Mapping[str, Sequence[tuple[str, float]]]
    copies: Mapping[str, int]
    base_model: str = "base"
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _choices: dict[str, _Choice] = field(init=False, repr=False)
    _replicas: dict[str, tuple[ReplicaId, ...]] = field(init=False, repr=False)
    _tick: itertools.count = field(init=False, repr=False)
    _last_used: dict[ReplicaId, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for g, n in self.copies.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"group {g!r}: copies must be a positive integer, got {n!r}")
        self._choices = {}
        for adapter, routes in self.routes.items():
            if not routes:
                raise ValueError(f"adapter {adapter!r}: no route")
            total = 0.0
            groups, cum = [], []
            for g, w in routes:
                if g not in self.copies:
                    raise ValueError(f"adapter {adapter!r}: routed to unknown group {g!r}")
                if w < 0:
                    raise ValueError(f"adapter {adapter!r}: negative weight for {g!r}")
                total += w
                groups.append(g)
                cum.append(total)
            if total <= 0:
                raise ValueError(f"adapter {adapter!r}: weights sum to 0")
            self._choices[adapter] = _Choice(tuple(groups), tuple(c / total for c in cum))
        self._replicas = {g: tuple(ReplicaId(g, i) for i in range(n))
                          for g, n in self.copies.items()}
        self._tick = itertools.count()
        self._last_used = {}

    @classmethod
    def from_plan(cls, plan: Any, *, base_model: str = "base", seed: int = 0) -> RoutingTable:
        """From a ``placement.plan.Plan`` (its routing table and group copies)."""
        return cls(
            routes={a: [(r.group, float(r.weight)) for r in rs] for a, rs in plan.routing.items()},
            copies={g.name: int(g.copies) for g in plan.groups},
            base_model=base_model, rng=random.Random(seed),
        )

    # -- queries ------------------------------------------------------------------------------
    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._choices)

    @property
    def replicas(self) -> tuple[ReplicaId, ...]:
        return tuple(r for rs in self._replicas.values() for r in rs)

    def knows(self, model: str) -> bool:
        return model == self.base_model or model in self._choices

    def groups_of(self, adapter: str) -> tuple[str, ...]:
        return self._choice(adapter).groups

    def _choice(self, adapter: str) -> _Choice:
        try:
            return self._choices[adapter]
        except KeyError:
            raise UnknownModel(
                f"The model {adapter!r} does not exist: it is neither an adapter of this "
                f"deployment nor the base model {self.base_model!r}; list them with GET /v1/models",
                param="model",
            ) from None

    def pick_group(self, adapter: str, among: Collection[str] | None = None) -> str:
        """A group serving ``adapter``, drawn by the plan's weights (restricted to ``among``,
        renormalised, when given: the groups a retry may still use)."""
        c = self._choice(adapter)
        groups, cum = c.groups, c.cumulative
        if among is not None:
            keep = [i for i, g in enumerate(groups) if g in among]
            if not keep:
                raise ValueError(f"adapter {adapter!r}: none of its groups is left")
            weights = [cum[i] - (cum[i - 1] if i else 0.0) for i in keep]
            total = sum(weights)
            if len(keep) < len(groups) and total > 0:
                groups = tuple(groups[i] for i in keep)
                cum = tuple(itertools.accumulate(w / total for w in weights))
            elif len(keep) < len(groups):  # only zero-weight groups left: any of them
                groups = tuple(groups[i] for i in keep)
                cum = tuple((k + 1) / len(groups) for k in range(len(groups)))
        if len(groups) == 1:
            return groups[0]
        i = bisect.bisect_right(cum, self.rng.random())
        return groups[min(i, len(groups) - 1)]

    def route(self, model: str, load: Callable[[ReplicaId], int],
              exclude: Collection[ReplicaId] = ()) -> ReplicaId | None:
        """The replica for one request to ``model`` (adapter id or the base model name), or
        None when every copy that serves it is in ``exclude``.

        First choice and retry are one rule: a group by the plan's weights among the groups
        that still have a copy not in ``exclude`` (the replicas this request already failed
        on), then that group's least-loaded such copy (ties: the one used least recently)."""
        if model == self.base_model:
            candidates = [r for r in self.replicas if r not in exclude]
        else:
            open_groups = [g for g in self.groups_of(model)
                           if any(r not in exclude for r in self._replicas[g])]
            if not open_groups:
                return None
            group = self.pick_group(model, open_groups if exclude else None)
            candidates = [r for r in self._replicas[group] if r not in exclude]
        if not candidates:
            return None
        best = min(candidates, key=lambda r: (load(r), self._last_used.get(r, -1)))
        self._last_used[best] = next(self._tick)
        return best

    def may_retry(self, attempts: int) -> bool:
        """Whether a request whose ``attempts``-th replica failed (died, unreachable) goes to
        another copy: once (``MAX_ATTEMPTS``), then it fails explicitly, never hangs."""
        return attempts < MAX_ATTEMPTS
