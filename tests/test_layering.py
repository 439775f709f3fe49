"""The layer rules of docs/design.md, checked on the source (every import, module level or inside functions,
TYPE_CHECKING blocks included): nothing imports upward, config/ needs no torch, and parallel/ has no import cycle."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megaocto")

# package -> packages it must never import (directly or from inside a function)
FORBIDDEN = {
    "config": ("torch", "megaocto.parallel", "megaocto.model", "megaocto.training", "megaocto.kernels"),
    "parallel": ("megaocto.model", "megaocto.training", "megaocto.kernels", "megaocto.data", "megaocto.generation"),
    "kernels": ("megaocto.model", "megaocto.training", "megaocto.generation", "megaocto.data", "megaocto.eval"),
    "checkpoint": ("megaocto.training", "megaocto.convert", "megaocto.generation", "megaocto.model"),
    "model": ("megaocto.training", "megaocto.data", "megaocto.generation", "megaocto.convert", "megaocto.eval"),
    "generation": ("megaocto.training", "megaocto.convert", "megaocto.eval"),
    "convert": ("megaocto.training", "megaocto.eval"),
    "eval": ("megaocto.training", "megaocto.convert"),
    "data": ("megaocto.model", "megaocto.training", "megaocto.parallel", "megaocto.generation"),
}


def _imports(path, module):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[:-node.level] if not path.endswith("__init__.py") else \
                    module.split(".")[:len(module.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            for a in node.names:  # `from megaocto import checkpoint` names a subpackage
                yield node.lineno, f"{target}.{a.name}"


def _modules(package):
    pkg_dir = os.path.join(ROOT, package)
    for dirpath, _, files in os.walk(pkg_dir):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    bad = []
    for path, module in _modules(package):
        for line, target in _imports(path, module):
            for banned in FORBIDDEN[package]:
                if target == banned or target.startswith(banned + "."):
                    bad.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line}: imports {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_parallel_has_no_import_cycle():
    graph = {}
    for path, module in _modules("parallel"):
        graph[module] = {t for _, t in _imports(path, module) if t.startswith("megaocto.parallel.")}
    graph = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    pkg = "megaocto.parallel"
    graph[pkg] = set()  # the package __init__ re-exports; modules must not import it back
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for t in graph.get(m, ()):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, t]))
            if t not in state:
                visit(t, stack + [m])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [])
