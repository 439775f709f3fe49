"""Build a small local git repository of real code with a realistic single-file commit history.

The demo (`megaocto demo`) needs commits without network access. We replay megaocto's own
sources as history: every top-level function or class becomes one small file, added first
without its docstrings ("Add the function build_parser") and then documented in a second
commit ("Document build_parser and its arguments") — an instruction / before / after triple
like CommitPackFT's. Author, committer and dates are fixed, so the repository (and every
commit hash) is identical on every machine.
"""
from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

_ENV = {
    "GIT_AUTHOR_NAME": "megaocto demo",
    "GIT_AUTHOR_EMAIL": "demo@megaocto.invalid",
    "GIT_COMMITTER_NAME": "megaocto demo",
    "GIT_COMMITTER_EMAIL": "demo@megaocto.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_SYSTEM": os.devnull,
}


def _git(repo: Path, *args: str, env: dict | None = None) -> str:
    full_env = {**os.environ, **_ENV, **(env or {})}
    out = subprocess.run(["git", *args], cwd=repo, env=full_env, check=True, capture_output=True, text=True)
    return out.stdout


def _blocks(source: str) -> list[tuple[str, str]]:
    """Split a module into (kind-and-name, text) top-level blocks, keeping the header with the first."""
    lines = source.splitlines(keepends=True)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return [("module", source)]
    starts = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            starts.append((first, f"{kind} {node.name}"))
    if not starts:
        return [("module", source)]
    cuts = [0] + [s for s, _ in starts[1:]] + [len(lines)]
    names = [starts[0][1]] + [n for _, n in starts[1:]]
    return [(names[i], "".join(lines[cuts[i]:cuts[i + 1]])) for i in range(len(names))]


def _strip_docstrings(block: str) -> str:
    """The block with its class and function docstrings removed."""
    try:
        tree = ast.parse(block)
    except SyntaxError:
        return block
    drop: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body and len(body) > 1
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            drop.update(range(body[0].lineno, body[0].end_lineno + 1))
    return "".join(line for i, line in enumerate(block.splitlines(keepends=True), 1) if i not in drop)


# Subjects pass the CommitPackFT rules: imperative verb, > 4 words, file name not mentioned.
_ADD = ["Add the {1} {0} to this module", "Implement {1} as a new {0} here", "Introduce the {1} {0} for callers"]
_DOC = ["Document {1} and describe its arguments", "Add docstrings to the {1} {0}", "Explain what the {1} {0} does"]


def make_demo_repo(path: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                   max_files: int = 400) -> Path:
    """Create (or reuse, if already complete) a git repo at `path`; returns its path."""
    repo = Path(path)
    marker = repo / ".git" / "megaocto-demo-complete"
    if marker.exists():
        return repo
    if source_dir is None:
        source_dir = Path(__file__).resolve().parent
    files = sorted(p for p in Path(source_dir).rglob("*.py")
                   if "__pycache__" not in p.parts and p.stat().st_size > 0)[:max_files]
    if not files:
        raise FileNotFoundError(f"no .py files under {source_dir} to build the demo repository from")
    repo.mkdir(parents=True, exist_ok=True)
    _git(repo, "init", "-q", "-b", "main")
    step = 0

    def commit(rel: Path, text: str, subject: str, detail: str) -> None:
        nonlocal step
        dest = repo / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        _git(repo, "add", rel.as_posix())
        date = f"{1_700_000_000 + 3600 * step} +0000"
        _git(repo, "commit", "-q", "--no-verify", "-m", f"{subject}\n\n{detail}\n",
             env={"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
        step += 1

    for src in files:
        module = src.relative_to(source_dir).with_suffix("")
        for i, (kind_name, block) in enumerate(_blocks(src.read_text(encoding="utf-8"))):
            kind, _, name = kind_name.partition(" ")
            if kind == "module":
                continue
            # One small file per top-level definition: first without docstrings, then documented.
            rel = module.parent / f"{module.name}_{i:02d}.py"
            bare = _strip_docstrings(block)
            commit(rel, bare, _ADD[step % 3].format(kind, name), f"From {module.as_posix()}.py.")
            if bare != block:
                commit(rel, block, _DOC[step % 3].format(kind, name), "Docstrings only; no code change.")
    if step == 0:
        raise ValueError(f"no top-level functions or classes in the .py files under {source_dir}")
    marker.write_text(f"{step} commits\n")
    return repo
