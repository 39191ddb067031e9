"""The import graph of lorafleet's packages: every import, module-level or inside a function.

    python scripts/import_graph.py              # sub-package -> sub-package edges, with counts
    python scripts/import_graph.py --modules    # module -> module edges
    python scripts/import_graph.py --check      # exit 1 on a cycle or a rule broken (below)

An import inside a function is an import (a lazy import hides a cycle, it does not remove it);
``if TYPE_CHECKING:`` blocks are left out (they never run). The rules (``RULES``), which
``tests/test_imports.py`` enforces:

* no cycle between modules, nor between the packages and sub-packages they form;
* arrows point down: twin imports neither placement nor orchestrator nor load_tests, placement
  imports neither orchestrator nor load_tests, and the serving corridor never imports the
  control corridor;
* twin and placement import no Ray, vLLM or web framework.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("twin", "placement", "orchestrator", "load_tests")
FORBIDDEN_IN_CORE = ("ray", "vllm", "fastapi", "starlette", "uvicorn")
# (importer prefix, imported prefix): the importer must not import it
UPWARD = (
    ("twin", "placement"), ("twin", "orchestrator"), ("twin", "load_tests"),
    ("placement", "orchestrator"), ("placement", "load_tests"),
    ("orchestrator.serving", "orchestrator.control"),
)


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module (one of ours) or a third-party top-level name
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else (
                test.attr if isinstance(test, ast.Attribute) else None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    for sub in ast.walk(child):
                        if hasattr(sub, "lineno"):
                            skip.add(sub.lineno)
    return skip


def _resolve(module: str, level: int, name: str | None, is_pkg: bool) -> str:
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import of every module of ours (function-level ones included)."""
    out: list[Edge] = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node.level, node.module, is_pkg)
                for a in node.names:
                    full = f"{base}.{a.name}" if base else a.name
                    targets.append(full if full in modules else base)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                targets = [node.args[0].value]
            for t in targets:
                dst = _ours(t, modules)
                out.append(Edge(mod, dst if dst else t.split(".")[0], node.lineno))
    return out


def _ours(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def group(mod: str) -> str:
    """The sub-package a module belongs to (``orchestrator.serving``, ``twin``, ...)."""
    parts = mod.split(".")
    if parts[0] == "orchestrator" and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0] if len(parts) > 1 or parts[0] in PACKAGES else mod


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), or a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(all_edges: Iterable[Edge], modules: dict[str, Path]) -> list[str]:
    """Every broken rule, one line each (module docstring)."""
    all_edges = list(all_edges)
    out: list[str] = []
    mod_graph: dict[str, set[str]] = defaultdict(set)
    pkg_graph: dict[str, set[str]] = defaultdict(set)
    top_graph: dict[str, set[str]] = defaultdict(set)
    for e in all_edges:
        if e.dst in modules and e.dst != e.src and not e.src.startswith(e.dst + "."):
            mod_graph[e.src].add(e.dst)
            if group(e.src) != group(e.dst):
                pkg_graph[group(e.src)].add(group(e.dst))
            top, dst_top = e.src.split(".")[0], e.dst.split(".")[0]
            if top != dst_top:
                top_graph[top].add(dst_top)
    for comp in cycles(mod_graph):
        out.append(f"import cycle between modules: {' <-> '.join(comp)}")
    for comp in cycles(pkg_graph):
        out.append(f"import cycle between packages: {' <-> '.join(comp)}")
    for comp in cycles(top_graph):
        out.append(f"import cycle between top-level packages: {' <-> '.join(comp)}")
    for e in all_edges:
        for src, dst in UPWARD:
            if (e.src == src or e.src.startswith(src + ".")) and (
                    e.dst == dst or e.dst.startswith(dst + ".")):
                out.append(f"upward import: {e.src} imports {e.dst} (line {e.line})")
        if e.src.split(".")[0] in ("twin", "placement") and e.dst in FORBIDDEN_IN_CORE:
            out.append(f"{e.src} imports {e.dst} (line {e.line}): twin/ and placement/ never "
                       f"import {', '.join(FORBIDDEN_IN_CORE)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", action="store_true", help="module-level edges")
    ap.add_argument("--check", action="store_true", help="exit 1 on a broken rule")
    args = ap.parse_args(argv)
    modules = our_modules()
    all_edges = edges(modules)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for e in all_edges:
        if e.dst in modules and e.src != e.dst:
            key = (e.src, e.dst) if args.modules else (group(e.src), group(e.dst))
            if key[0] != key[1]:
                counts[key] += 1
    for (a, b), n in sorted(counts.items()):
        print(f"{a} -> {b}  ({n})")
    found = problems(all_edges, modules)
    for p in found:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
