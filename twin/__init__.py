"""Digital Twin of one vLLM V1 engine serving LoRA adapters (docs/twin.md).

Modules, one job each:
  workload, lengths, azure_trace  adapters and rates, request lengths, the Azure trace loader
  requests        the arrival-sorted request arrays a run consumes
  config          EngineConfig (max_loras, max_num_seqs, ...), validated like vLLM does
  profile         calibration profile: step model, KV capacity, adapter load table
  latency         the step-time model (what one engine step costs)
  adapters        the worker's LoRA caches (CPU cache, GPU slots)
  engine          the step-by-step V1 scheduler / KV / adapter emulation
  metrics         benchmark-style figures from a run
  simulate        simulate(workload, config, profile, seed): the pure entry point
  replica         ReplicaLoad and the ReplicaPredictor interface (twin runs behind it)
  client_cap      a load generator's in-flight cap as the uncapped load a model knows
  parallel        one parallel-map abstraction for fanning runs out
  step_features, calibrate  labelling measured steps; fitting a profile
  runs_table, validate      the measured-runs table; replaying it in the twin and scoring
  surrogate, surrogate_data, surrogate_features  the LightGBM surrogate, its design, inputs

Layer rule: imports nothing of lorafleet's other packages, and no Ray, vLLM or web framework.
"""
