#!/usr/bin/env bash
# One short device run: vLLM 0.8.5's LoRA kernels on the lent GPU (docs/gpu_kernel_sweep.md).
#
#   here:    python benchmarks/gpu_lora_kernels.py prepare     # .vllm_kernels/ (≈ 60 kB, ignored)
#   device:  bash scripts/gpu_kernel_sweep.sh                    # carry: .vllm_kernels
#
# Needs torch + Triton (no vLLM, no network). Writes under $OUT/gpu_lora_kernels (or
# out/gpu_lora_kernels without $OUT): lora_kernel_times.csv (row by row), sweep.log (line by
# line), provenance.json, README.md, console.log, nvidia-smi.txt. The sweep starts no
# measurement that would end after BUDGET_S seconds (default 400) and a hard `timeout` backs it
# up, so the whole script ends within ≈ 8 minutes and a cut-off run still returns its rows.
# Extra arguments go to `gpu_lora_kernels.py run` (e.g. --models llama-3.1-8b-instruct).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-out}/gpu_lora_kernels"
BUDGET_S="${BUDGET_S:-400}"
KERNELS_DIR="${KERNELS_DIR:-.vllm_kernels/vllm-0.8.5}"
mkdir -p "$DEST"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/lorafleet-triton-cache}"
export PYTHONUNBUFFERED=1

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c "import torch, triton" 2>/dev/null; then
      PY="$cand"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "error: no python with torch and triton on PATH (set PYTHON=...)" | tee "$DEST/console.log"
  exit 2
fi
if [ ! -f "$KERNELS_DIR/SOURCE.json" ]; then
  echo "error: $KERNELS_DIR missing: run 'python benchmarks/gpu_lora_kernels.py prepare' and" \
       "carry .vllm_kernels" | tee "$DEST/console.log"
  exit 2
fi
nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1 || true
echo "[sweep] $($PY -c 'import sys, torch, triton; print(sys.executable, "torch", torch.__version__, "triton", triton.__version__)'), budget ${BUDGET_S}s -> $DEST"

# SIGTERM at budget + 60 s lets the harness write provenance; SIGKILL 15 s later if it hangs
timeout -k 15 "$((${BUDGET_S%.*} + 60))" \
  "$PY" benchmarks/gpu_lora_kernels.py run --device cuda --kernels-dir "$KERNELS_DIR" \
  --out "$DEST" --budget-s "$BUDGET_S" "$@" 2>&1 | tee "$DEST/console.log"
rc=${PIPESTATUS[0]}
rows=0
if [ -f "$DEST/lora_kernel_times.csv" ]; then rows=$(($(wc -l < "$DEST/lora_kernel_times.csv") - 1)); fi
echo "[sweep] exit $rc; $rows rows in $DEST/lora_kernel_times.csv"
exit "$rc"
