"""The import rules of the house (scripts/import_graph.py): no cycle between modules or
packages, arrows pointing down, and no Ray, vLLM or web framework in twin/ or placement/.
Each rule is shown to fire on a small made-up tree, then checked on the repository."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts/import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    """Modules (dotted name -> path) written under ``tmp_path``."""
    out = {}
    for name, text in files.items():
        path = tmp_path / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out[name] = path
    return out


def found(graph, modules: dict[str, Path]) -> list[str]:
    return graph.problems(graph.edges(modules), modules)


def test_the_repository_keeps_every_rule(graph):
    modules = graph.our_modules()
    assert {"twin.engine", "placement.choose", "orchestrator.serving.ingress",
            "orchestrator.control.controller"} <= set(modules)
    assert found(graph, modules) == []


def test_a_cycle_held_by_a_lazy_import_is_a_cycle(graph, tmp_path):
    mods = tree(tmp_path, {
        "placement.a": "from placement.b import f\n",
        "placement.b": "def f():\n    from placement.a import g\n    return g\n",
    })
    assert found(graph, mods) == ["import cycle between modules: placement.a <-> placement.b"]


def test_type_checking_imports_are_not_edges(graph, tmp_path):
    mods = tree(tmp_path, {
        "placement.a": "from placement.b import f\n",
        "placement.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from placement.a import g\n",
    })
    assert found(graph, mods) == []


def test_a_cycle_between_sub_packages(graph, tmp_path):
    mods = tree(tmp_path, {
        "orchestrator.cli.x": "from orchestrator.measure.y import f\n",
        "orchestrator.measure.y": "def f():\n    pass\n",
        "orchestrator.measure.z": "from orchestrator.cli.w import g\n",
        "orchestrator.cli.w": "def g():\n    pass\n",
    })
    assert found(graph, mods) == [
        "import cycle between packages: orchestrator.cli <-> orchestrator.measure"]


@pytest.mark.parametrize(("src", "dst"), [
    ("twin.a", "placement.b"), ("twin.a", "orchestrator.serving.b"), ("twin.a", "load_tests.b"),
    ("placement.a", "orchestrator.control.b"), ("placement.a", "load_tests.b"),
    ("orchestrator.serving.a", "orchestrator.control.b"),
])
def test_an_upward_import_is_refused(graph, tmp_path, src, dst):
    mods = tree(tmp_path, {src: f"import {dst}\n", dst: "X = 1\n"})
    assert found(graph, mods) == [f"upward import: {src} imports {dst} (line 1)"]


def test_the_control_corridor_may_drive_the_serving_one(graph, tmp_path):
    mods = tree(tmp_path, {"orchestrator.control.a": "import orchestrator.serving.b\n",
                           "orchestrator.serving.b": "X = 1\n"})
    assert found(graph, mods) == []


@pytest.mark.parametrize("lib", ["ray", "vllm", "fastapi", "starlette", "uvicorn"])
@pytest.mark.parametrize("pkg", ["twin", "placement"])
def test_core_packages_import_no_serving_framework(graph, tmp_path, pkg, lib):
    mods = tree(tmp_path, {f"{pkg}.a": f"def f():\n    from {lib}.sub import thing\n"})
    problems = found(graph, mods)
    assert len(problems) == 1 and problems[0].startswith(f"{pkg}.a imports {lib} (line 2)")
    # the same import is fine where it belongs
    assert found(graph, tree(tmp_path, {"orchestrator.serving.a": f"import {lib}\n"})) == []


@pytest.mark.parametrize("module", ["orchestrator.serving.vllm_engine",
                                    "orchestrator.serving.replica", "orchestrator.serving.app",
                                    "orchestrator.measure.bench", "orchestrator.measure.profile"])
def test_processes_that_host_vllm_load_no_compiler(module):
    """vLLM 0.32's CPU worker rebinds Triton kernels by scanning every loaded module and calling
    ``vars(value).get`` on their attributes; llvmlite's library wrapper (loaded by numba) answers
    ``__dict__`` with a function wrapper and the engine fails to start. So the modules a vLLM
    engine's process imports must not load numba (the compiled twin stays in the processes that
    run it: planning, the controller, sim replicas)."""
    import subprocess
    import sys

    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"{module} loads {out}"
