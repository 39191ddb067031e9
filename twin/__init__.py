"""Digital Twin of one vLLM V1 engine serving LoRA adapters.

Modules, one job each:
  workload       adapters, rates, the workload YAML, request generation
  lengths        request-length models (fixed, normal, lognormal, empirical, ShareGPT-like)
  azure_trace    the Azure LLM inference trace loader
  config         EngineConfig (max_loras, max_num_seqs, ...), validated like vLLM does
  profile        calibration profile: step model, KV capacity, adapter load table
  latency        the step-time model (what one engine step costs)
  engine         the step-by-step V1 scheduler/KV/adapter emulation
  metrics        benchmark-style figures from a run
  simulate       simulate(workload, config, profile, seed): the pure entry point
  step_features  labelling measured steps with their batch composition
  calibrate      fitting a profile from measurements

Layer rule: never imports ray or vllm.
"""
