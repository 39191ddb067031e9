"""Surrogate speed: one prediction, and a batch of 1,000, of a shipped surrogate.

The loads are a seeded draw of the surrogate's own designed space (1 to 1,500 adapters, every
rate shape, rank mix and length model), so the single-prediction time is the mean over a
realistic mix, not the best case. Figures are medians of ``--repeat`` repeats. Prints one JSON
line:

    python benchmarks/surrogate_speed.py [--profile NAME] [--loads N] [--repeat K]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from twin.surrogate import load_surrogate, time_predictions
from twin.surrogate_data import length_menu, sample_space


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="llama-3.1-8b-instruct")
    ap.add_argument("--loads", type=int, default=200, help="distinct (load, config) pairs")
    ap.add_argument("--repeat", type=int, default=7, help="report the median of K repeats")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()

    model = load_surrogate(args.profile)
    menu = {name: lm for name, lm, _ in length_menu(model.profile.max_model_len)}
    pairs = [s.build(menu) for s in sample_space(args.loads, model.profile, seed=args.seed)]
    loads, configs = [p[0] for p in pairs], [p[1] for p in pairs]
    times = time_predictions(model, loads, configs, repeats=args.repeat)
    print(
        json.dumps(
            {
                "benchmark": "surrogate_speed",
                "profile": model.profile.name,
                **times,
                "loads": len(loads),
                "median_adapters": int(np.median([ld.n_adapters for ld in loads])),
                "trees": sum(b.num_trees() for b in model.boosters_.values()),
                "compiled_trees": model.forest_ is not None,
                "models": list(model.model_names),
            }
        )
    )


if __name__ == "__main__":
    main()
