"""Live fidelity: real vLLM (CPU build, tiny model) through the deployed serving path vs the
twin's replay of the same requests, for the three CPU workloads, each twice.

One JSON line per workload: measured and replayed throughput, TTFT p50/p99, ITL p50/p99,
``errors`` (replayed / measured - 1), ``spread`` (run-to-run) and ``within_target``
(throughput and p50s: max(15 %, 1.5 x spread); p99s: max(30 %, 1.5 x spread)).

    python benchmarks/live_fidelity.py [--window 60] [--profile tiny-llama-cpu] [--engine vllm]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.measure.fidelity import rescore_windows, run_fidelity
from orchestrator.measure.tiny_model import build_tiny_model
from twin.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = [ROOT / "examples" / f"workload_cpu_{n}.yaml" for n in ("light", "busy", "saturated")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=60.0, help="measured window per run (s)")
    ap.add_argument("--profile", default="tiny-llama-cpu")
    ap.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    ap.add_argument("--out", default="out/live_fidelity")
    ap.add_argument("--rescore", metavar="PKL", default=None,
                    help="score the windows an earlier run saved (OUT/state/"
                    "fidelity-windows.pkl) with --profile again, without serving")
    args = ap.parse_args()
    if args.rescore:
        for row in rescore_windows(args.rescore, load_profile(args.profile)):
            print(json.dumps({"benchmark": "live_fidelity", "rescored": True, **row}))
        return
    out = Path(args.out).resolve()
    build_tiny_model(out / "tiny", 6, (8, 16), overwrite=True)
    for row in run_fidelity(out / "tiny", load_profile(args.profile), WORKLOADS,
                            engine=args.engine, window_s=args.window, state_dir=out / "state",
                            progress=lambda m: print(f"[live_fidelity] {m}", file=sys.stderr)):
        print(json.dumps({"benchmark": "live_fidelity", **row}), flush=True)


if __name__ == "__main__":
    main()
