"""Live-engine loop figures: profile a real vLLM on this machine, calibrate, bench, validate.

Prints one JSON line: the step-fit error on held-out profiling runs and, per workload, measured
(two runs, same requests) vs twin throughput / TTFT / ITL with SMAPE and the run-to-run SMAPE.

    python benchmarks/live_loop.py [--full] [--window 60] [--out out/live_loop]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.measure.loop import run_live_loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full profiling sweep (not --quick)")
    ap.add_argument("--window", type=float, default=60.0, help="bench window (s)")
    ap.add_argument("--out", default="out/live_loop")
    args = ap.parse_args()
    res = run_live_loop(
        Path(args.out), quick=not args.full, window_s=args.window,
        log=lambda m: print(f"[live_loop] {m}", file=sys.stderr),
    )
    res.pop("predictions")
    print(json.dumps({"benchmark": "live_loop", **res}))


if __name__ == "__main__":
    main()
