"""Placement: which adapters go on which replica, with how many slots, routed how, on how many
replicas. docs/placement.md describes the algorithms, docs/plan_format.md the output.

* ``context``, ``policy``: what a policy is given, the ``PlacementPolicy`` interface, the registry;
* ``common``: what every policy shares (specs -> plan, sizing, routing, early checks);
* ``replica_optimum``: max_loras / max_cpu_loras / headroom of one replica, batched;
* ``packing``: the ``lorafleet`` policy; ``baselines/``: published policies, as published;
* ``lower_bound``: the bound printed with every plan; ``capacity_estimate``: the mix's estimate;
* ``analytic``, ``predictors``: the closed-form predictor and predictor selection;
* ``planner``: one policy's plan; ``choose``: the one rule that chooses among plans (twin
  verification, tightening, score); ``compare``: every policy side by side;
* ``verify``: full twin runs of a plan; ``consolidate``: shrinking a running plan in place;
* ``budget``: the GPU-budget error; ``audit``: plans checked on random workloads;
* ``plan``: the plan format; ``synthetic``: hand-shaped plans for tests and benchmarks.

Layer rule: imports twin only, never Ray, vLLM or a web framework.
"""
