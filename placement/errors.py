"""Placement errors: user-facing; each message says what is wrong and what would fit."""

from __future__ import annotations


class PlacementError(ValueError):
    """A workload that cannot be placed as asked (rank, memory, GPU budget, predictor missing)."""


class PlanFormatError(PlacementError):
    """A plan file that is malformed or inconsistent; the message starts with the field path."""
