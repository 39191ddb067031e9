"""Orchestrator: the CLI now; the Ray Serve app, engine replicas and controller later.

Layer rule: the only package that imports ray (and vllm, lazily).
"""
