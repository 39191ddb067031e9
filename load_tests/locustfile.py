"""Locust users for a lorafleet deployment: each request picks an adapter with the workload's
weights (its per-adapter rates) and a prompt/output length from its length model.

    LORAFLEET_WORKLOAD=examples/workload_cpu_light.yaml \\
      locust -f load_tests/locustfile.py --headless -u 8 -r 4 -t 60s --host http://127.0.0.1:8000

Locust is closed loop (each user waits for its response, then ``wait_time``): good for finding
the request rate a deployment sustains, not for latency under a fixed offered load - use
``python -m load_tests.openloop`` for that. Requests stream (``/v1/completions``, ``ignore_eos``)
and each is reported once, named by the replica that served it (``/v1/completions [group/copy]``
from ``x-lorafleet-replica``), so locust's table shows per-replica latency and its aggregate row
the real request rate. ``LORAFLEET_API_KEY`` adds a bearer key; ``LORAFLEET_SEED`` seeds the picks.
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
from locust import HttpUser, between, events, task

from load_tests.openloop import DEFAULT_VOCAB, FIRST_PROMPT_TOKEN
from twin.workload import Workload

WORKLOAD_ENV = "LORAFLEET_WORKLOAD"


class _Mix:
    """Adapter ids with their rate weights + the length model, loaded once per process."""

    def __init__(self, path: str, seed: int) -> None:
        self.workload = Workload.from_yaml(path)
        self.ids = [a.id for a in self.workload.adapters]
        rates = np.asarray(self.workload.adapter_rates, dtype=float)
        self.weights = (rates / rates.sum()).tolist() if rates.sum() > 0 else None
        self.rng = np.random.default_rng(seed)

    def pick(self, rnd: random.Random) -> tuple[str, int, int]:
        adapter = rnd.choices(self.ids, weights=self.weights)[0]
        prompt, output = self.workload.lengths.sample(self.rng, 1)
        return adapter, int(prompt[0]), int(output[0])


@events.test_start.add_listener
def _load_workload(environment, **_kw) -> None:
    """The mix lives on locust's Environment (no module state), loaded once per process."""
    path = os.environ.get(WORKLOAD_ENV, "examples/workload_cpu_light.yaml")
    environment.lorafleet_mix = _Mix(path, int(os.environ.get("LORAFLEET_SEED", "0")))


class AdapterUser(HttpUser):
    """One client: picks an adapter by the workload's weights, streams one completion."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        key = os.environ.get("LORAFLEET_API_KEY")
        if key:
            self.client.headers["authorization"] = f"Bearer {key}"
        self.rnd = random.Random()

    @task
    def completion(self) -> None:
        if getattr(self.environment, "lorafleet_mix", None) is None:
            _load_workload(self.environment)
        adapter, n_prompt, n_out = self.environment.lorafleet_mix.pick(self.rnd)
        vocab = int(os.environ.get("LORAFLEET_VOCAB", DEFAULT_VOCAB))
        prompt = [self.rnd.randrange(FIRST_PROMPT_TOKEN, vocab) for _ in range(n_prompt)]
        body = {"model": adapter, "prompt": prompt, "max_tokens": n_out, "stream": True,
                "ignore_eos": True}
        t0 = time.perf_counter()
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                              name="/v1/completions") as r:
            replica = r.headers.get("x-lorafleet-replica", "none")
            r.request_meta["name"] = f"/v1/completions [{replica}]"  # the one event it fires
            if r.status_code != 200:
                r.failure(f"{r.status_code} from {replica}: {r.text[:200]}")
                return
            chunks = sum(1 for line in r.iter_lines() if line.startswith(b"data: {"))
            if chunks == 0:
                r.failure(f"empty stream from {replica}")
                return
            # the stream's whole time, not the headers' (locust times the call until they came)
            r.request_meta["response_time"] = (time.perf_counter() - t0) * 1e3
            r.request_meta["response_length"] = chunks
            r.success()
