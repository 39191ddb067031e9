"""Placement: which adapters go on which replica, with how many slots (arrives with issue #4).

Layer rule: imports twin, never ray or vllm.
"""
