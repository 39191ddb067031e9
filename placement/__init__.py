"""Placement: which adapters go on which replica, with how many slots, routed how, on how many
replicas (issue #4). docs/placement.md describes the algorithms, docs/plan_format.md the output.

* ``policy``: the ``PlacementPolicy`` interface, ``PlacementContext`` and the policy registry;
* ``common``: what every policy shares (specs -> plan, sizing, routing, early checks);
* ``replica_optimum``: max_loras / max_cpu_loras / headroom of one replica, batched;
* ``lower_bound``: the lower bound on replicas printed with every plan;
* ``packing``: the ``lorafleet`` policy (rank-aware packing, hot-adapter splits);
* ``analytic``, ``predictors``: the closed-form predictor and predictor selection;
* ``plan``: the plan format; ``verify``: full twin runs of a plan; ``planner``: CLI entry points.

Layer rule: imports twin, never ray or vllm.
"""
