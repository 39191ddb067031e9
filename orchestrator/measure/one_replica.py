"""One engine replica serving a set of adapters, deployed for a measurement and gone after.

The serving-path fit and the fidelity benchmark both measure the real path - listener, ingress,
one replica - and replay what they measured on that replica's plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from orchestrator.control.controller import ControllerSettings
from orchestrator.control.deploy import DeployState, local_deployment
from orchestrator.serving.spec import ServingSpec
from placement.plan import Plan
from placement.synthetic import GroupShape, synthetic_plan


def one_replica_plan(name: str, adapters: Sequence[tuple[str, int]], profile: str) -> Plan:
    """One group, one copy, a slot for every adapter: what is measured is the path, not the
    ``max_loras`` rule."""
    return synthetic_plan([GroupShape(name, sorted(adapters))], profile=profile)


@contextlib.contextmanager
def one_replica(name: str, adapters: Sequence[tuple[str, int]], model_dir: str | Path, *,
                engine: str, profile: str, state_dir: str | Path,
                progress: Callable[[str], None] = print) -> Iterator[tuple[Plan, DeployState]]:
    """Deploy ``one_replica_plan`` of ``model_dir`` on a private local head (the controller
    watches, applies nothing); shut it all down after the block."""
    plan = one_replica_plan(name, adapters, profile)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    plan_path = state_dir / f"{name}-plan.yaml"
    plan.to_yaml(plan_path)
    spec = ServingSpec.from_args({"plan_path": str(plan_path), "engine": engine,
                                  "model": str(model_dir)})
    with local_deployment(spec, state_dir, settings=ControllerSettings(auto_apply=False),
                          progress=progress) as state:
        yield plan, state
