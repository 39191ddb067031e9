"""Where the twin's steps are too short on starved runs (docs/twin.md, "What is still wrong").

Reads the per-run predictions of ``lorafleet validate --out PRED.csv`` and prints, per model and
``max_loras``, the measured-minus-predicted ITL converted to time per engine step (the twin runs
``engine_steps`` steps in the hour and its ITL spans ITL/step of them) against the measured mean
batch (Prometheus ``num_running``), then a least-squares slope in µs per running request.

    python scripts/starved_step_gap.py out/validate/pred.csv [--max-loras 8 16]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd


def step_gaps(pred: pd.DataFrame) -> pd.DataFrame:
    """Starved runs with ``gap_ms``: missing time per engine step, and the measured batch."""
    d = pred[pred["measured_starved"].astype(bool)].copy()
    step_ms = 3600e3 / d["twin_engine_steps"]
    steps_per_itl = d["twin_itl_mean_ms"] / step_ms
    d["gap_ms"] = (d["itl_mean_ms"] - d["twin_itl_mean_ms"]) / steps_per_itl
    d["running"] = d["prom_mean_num_running"]
    return d[["model", "run", "workload", "max_loras", "max_lora_rank", "running", "gap_ms"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pred", help="predictions CSV written by `lorafleet validate --out`")
    ap.add_argument("--max-loras", type=int, nargs="*", default=[8, 16])
    args = ap.parse_args()
    gaps = step_gaps(pd.read_csv(args.pred))
    for (model, slots), g in gaps.groupby(["model", "max_loras"]):
        if slots not in args.max_loras or len(g) < 3:
            continue
        g = g.sort_values("running")
        slope, icpt = np.polyfit(g["running"], g["gap_ms"], 1)
        print(f"{model}  max_loras {slots}: {slope * 1e3:.0f} µs per running request "
              f"(intercept {icpt:.1f} ms, {len(g)} runs)")
        for r in g.itertuples():
            print(f"  {r.run:>14} rank {r.max_lora_rank:>2}  running {r.running:6.0f}  "
                  f"gap {r.gap_ms:6.1f} ms/step")


if __name__ == "__main__":
    main()
