"""Online calibration: the live fleet keeps the twin's serving-path term and step scale right.

A profile's serving path (``twin.serving_path``) was measured once, on one host, at one load. On
the deployment the engines may run faster or slower (another host, other neighbours on the CPU)
and the path may cost more (another network). From the telemetry the controller already has it
keeps two corrections on top of the profile's term:

* ``step_scale``  x the profile's: live ITL mean / the twin's, per replica, the median over the
  replicas that qualify;
* ``ttft_offset_ms`` + the profile's request term: the ingresses' live TTFT mean minus the
  twin's (the ingress sees every hop but the client's own network).

Guarded, so that an overloaded or failing replica is never calibrated into looking normal: a
replica qualifies only when nothing waits in its queue, it failed nothing, and it finished at
least ``min_requests`` in the window; each update moves a correction by at most ``max_step`` of
its value (or of the twin's TTFT), within ``scale_bounds``; a live/twin ratio beyond ``jump`` is
reported as an event (it is still followed, ``max_step`` at a time, so one bad window cannot
move the term far). The controller's twin runs (drift gaps, what-if, re-plan verification) use
``calibrated(profile)``. Pure: no Ray, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from twin.profile import Profile
from twin.serving_path import ServingPath


@dataclass(frozen=True)
class CalibrationConfig:
    enabled: bool = True
    min_requests: int = 30  # finished in the window, for a replica to qualify
    max_step: float = 0.10  # the most a correction moves per update (relative)
    jump: float = 0.30  # a live/twin ratio off 1 by more than this is reported
    scale_bounds: tuple[float, float] = (0.5, 3.0)  # of the profile's step scale

    def __post_init__(self) -> None:
        if self.min_requests < 1:
            raise ValueError(f"calibration.min_requests: must be >= 1, got {self.min_requests}")
        if not 0 < self.max_step < 1:
            raise ValueError(f"calibration.max_step: must be in (0, 1), got {self.max_step}")
        if self.jump <= 0:
            raise ValueError(f"calibration.jump: must be > 0, got {self.jump}")
        lo, hi = self.scale_bounds
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"calibration.scale_bounds: need 0 < low <= 1 <= high, got "
                             f"{self.scale_bounds}")


@dataclass
class OnlineCalibration:
    """The corrections (module docstring) and what they rest on."""

    step_scale: float = 1.0
    ttft_offset_ms: float = 0.0
    fitted_on: int = 0  # finished requests of the qualifying replicas, summed over updates
    updates: int = 0
    last: dict[str, Any] = field(default_factory=dict)  # the last update's inputs and outcome

    def calibrated(self, profile: Profile) -> Profile:
        """``profile`` with the corrections applied to its serving path (a profile without one
        gets a term holding only the corrections)."""
        if self.updates == 0:
            return profile
        base = profile.serving_path or ServingPath.engine_only(
            source="online calibration only (the profile measured no serving path)")
        term = replace(base, step_scale=float(np.clip(base.step_scale * self.step_scale, 0.2,
                                                      5.0)),
                       request_ms=max(0.0, base.request_ms + self.ttft_offset_ms))
        return profile.with_serving_path(term)

    def update(self, replicas: Mapping[str, Mapping[str, Any]],
               ingress: Mapping[str, Any] | None, predicted_ttft_ms: float,
               cfg: CalibrationConfig) -> list[str]:
        """One update from the replicas' ``{"live": ..., "predicted": ...}`` figures (``live``:
        ``WorkloadWindow.live_metrics``; ``predicted``: the twin's with the current
        calibration) and the ingresses' live figures; returns the jump notes (for an event)."""
        if not cfg.enabled:
            return []
        ratios, n, skipped = [], 0, {}
        for rid, r in sorted(replicas.items()):
            live, pred = r.get("live") or {}, r.get("predicted") or {}
            why = _unqualified(live, cfg)
            lv, pv = live.get("itl_mean_ms"), pred.get("itl_mean_ms")
            if why is None and not (_pos(lv) and _pos(pv)):
                why = "no ITL on one side"
            if why:
                skipped[rid] = why
                continue
            ratios.append(float(lv) / float(pv))
            n += int(live.get("finished", 0))
        notes: list[str] = []
        self.last = {"skipped": skipped, "replicas_used": len(ratios)}
        if not ratios:
            return notes
        ratio = float(np.median(ratios))
        if abs(ratio - 1) > cfg.jump:
            notes.append(f"live ITL {ratio:.2f}x the calibrated twin's on "
                         f"{len(ratios)} replica(s): the engines' speed changed")
        lo, hi = cfg.scale_bounds
        self.step_scale = float(np.clip(
            self.step_scale * np.clip(ratio, 1 - cfg.max_step, 1 + cfg.max_step), lo, hi))
        self.last["itl_ratio"] = round(ratio, 4)
        ing = ingress or {}
        lt = ing.get("ttft_mean_ms")
        if _pos(lt) and _pos(predicted_ttft_ms) and not ing.get("failed"):
            gap = float(lt) - float(predicted_ttft_ms)
            bound = max(1.0, cfg.max_step * float(predicted_ttft_ms))
            if abs(gap) > cfg.jump * float(predicted_ttft_ms):
                notes.append(f"live TTFT at the ingress {gap:+.1f} ms off the calibrated twin's "
                             f"{predicted_ttft_ms:.1f} ms")
            self.ttft_offset_ms += float(np.clip(gap, -bound, bound))
            self.last["ttft_gap_ms"] = round(gap, 3)
        self.fitted_on += n
        self.updates += 1
        return notes

    def describe(self, profile: Profile) -> str:
        term = self.calibrated(profile).serving_path
        if self.updates == 0 or term is None:
            return "not calibrated yet"
        return (f"step x{term.step_scale:.2f} + {term.decode_seq_ms:.2f} ms per decoding "
                f"sequence, serving path {term.request_ms:.1f} ms + "
                f"{term.prompt_token_ms * 1e3:.0f} us/prompt token, fitted on "
                f"{self.fitted_on:,} live requests ({self.updates} updates)")

    def to_dict(self, profile: Profile) -> dict[str, Any]:
        return {"step_scale": round(self.step_scale, 4),
                "ttft_offset_ms": round(self.ttft_offset_ms, 3), "fitted_on": self.fitted_on,
                "updates": self.updates, "summary": self.describe(profile), "last": self.last}


def _pos(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _unqualified(live: Mapping[str, Any], cfg: CalibrationConfig) -> str | None:
    """Why a replica's live figures must not calibrate the twin (None: they may)."""
    if live.get("waiting", 0):
        return f"{live['waiting']} waiting (queued: its latency is load, not the path)"
    if live.get("failed", 0):
        return f"{live['failed']} failed"
    if int(live.get("finished", 0)) < cfg.min_requests:
        return f"{int(live.get('finished', 0))} finished (< {cfg.min_requests})"
    return None
