"""Live-engine measurement: ``profile`` (per-step timings of a real vLLM for calibration),
``bench`` (a measured run in the runs-table format), ``loop`` (profile -> calibrate -> bench ->
validate), ``tiny_model`` (the generated random-weight model and adapters for CPU runs)."""
