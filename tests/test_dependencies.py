"""A plain `pip install megaocto` must have what megaocto imports: every third-party import in megaocto/ (an AST
scan, module level or inside functions) is declared in setup.py's install_requires, or guarded (inside a
`try: ... except ImportError` whose handler says what to install). Imports that need another distribution than
their top-level name (torch.utils.tensorboard -> tensorboard) are listed in IMPORT_NEEDS."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# distribution name (normalised) -> import name, where they differ
DIST_TO_IMPORT = {"pyyaml": "yaml", "pyahocorasick": "ahocorasick"}
# a module (and its submodules) whose import needs a distribution of another name
IMPORT_NEEDS = {"torch.utils.tensorboard": "tensorboard"}
GUARD_EXCEPTIONS = {"ImportError", "ModuleNotFoundError", "Exception"}


def setup_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires, extras_require) of setup.py as import names, read from its AST (setup.py is not run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: k.value for k in call.keywords}

    def names(node) -> set[str]:
        out = set()
        for elt in node.elts:
            dist = re.split(r"[<>=!~;\[ ]", ast.literal_eval(elt), maxsplit=1)[0].strip().lower().replace("-", "_")
            out.add(DIST_TO_IMPORT.get(dist, dist))
        return out

    extras = {ast.literal_eval(k): names(v) for k, v in zip(kw["extras_require"].keys, kw["extras_require"].values)}
    return names(kw["install_requires"]), extras


def _guarded(path: list[ast.AST]) -> bool:
    """Inside a try whose handlers catch ImportError and raise an error that says what to pip install."""
    for node in path:
        if isinstance(node, ast.Try):
            for h in node.handlers:
                caught = {getattr(e, "id", None) for e in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])}
                text = " ".join(c.value for c in ast.walk(h) if isinstance(c, ast.Constant) and isinstance(c.value, str))
                if caught & GUARD_EXCEPTIONS and "pip install" in text:
                    return True
    return False


def third_party_imports() -> list[tuple[str, str, int, bool]]:
    """[(needed distribution as import name, file, line, guarded)] for every import of a non-stdlib module."""
    found = []
    for file in sorted((ROOT / "megaocto").rglob("*.py")):
        tree = ast.parse(file.read_text(), str(file))

        def visit(node, path):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                return  # typing-only imports never run
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif node.level == 0 and node.module:
                    modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    modules = []
                for mod in modules:
                    top = mod.split(".")[0]
                    need = next((d for m, d in IMPORT_NEEDS.items() if mod == m or mod.startswith(m + ".")), top)
                    if need == top and (top in sys.stdlib_module_names or top in ("megaocto", "__future__")):
                        continue
                    found.append((need, str(file.relative_to(ROOT)), node.lineno, _guarded(path)))
            for child in ast.iter_child_nodes(node):
                visit(child, path + [node])

        visit(tree, [])
    return found


def test_every_third_party_import_is_declared_or_guarded():
    required, extras = setup_requirements()
    missing = sorted({(need, f"{file}:{line}") for need, file, line, guarded in third_party_imports()
                      if need not in required and not guarded})
    assert not missing, (
        "imported but neither in setup.py install_requires nor guarded by `except ImportError` with a "
        f"'pip install ...' message: {missing} (optional extras: {extras})")


def test_the_scan_sees_what_it_must():
    """The scan itself: it finds module-level, nested and tensorboard imports, and the guarded `datasets` one."""
    found = {(need, file): guarded for need, file, _, guarded in third_party_imports()}
    assert ("numpy", "megaocto/data/indexed.py") in found  # module level
    assert ("tensorboard", "megaocto/training/loggers.py") in found  # via torch.utils.tensorboard, in a method
    assert len({line for need, file, line, _ in third_party_imports()
                if (need, file) == ("tensorboard", "megaocto/training/loggers.py")}) >= 2  # ...summary import too
    assert ("transformers", "megaocto/convert/hf.py") in found  # inside functions
    assert found[("datasets", "megaocto/eval/humanevalpack.py")] is True  # guarded, with a pip install hint
    required, extras = setup_requirements()
    assert {"torch", "yaml", "tensorboard", "transformers"} <= required and "datasets" in extras["hub"]
