"""Build a small local git repository of real code with a realistic single-file commit history.

The demo (`megaocto demo`) needs commits without network access. We replay megaocto's own
source files as history: each file is introduced with its first top-level block, then every
further function or class arrives in its own commit with an imperative subject
("Add the `build_parser` helper"). Author, committer and dates are fixed, so the repository
(and every commit hash) is identical on every machine.
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


def _subject(kind_name: str, step: int) -> str:
    kind, _, name = kind_name.partition(" ")
    if kind == "class":
        verbs = ["Add the {} class", "Introduce class {} with its methods", "Implement the {} class"]
    elif kind == "function":
        verbs = ["Add the {} helper function", "Implement {} and document its arguments",
                 "Introduce function {} for callers"]
    else:
        return "Add module with its initial contents"
    return verbs[step % len(verbs)].format(name)


def make_demo_repo(path: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                   max_files: int = 40) -> Path:
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
    t = 1_700_000_000
    step = 0
    for src in files:
        rel = src.relative_to(source_dir)
        text = src.read_text(encoding="utf-8")
        blocks = _blocks(text)
        dest = repo / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        acc = ""
        for i, (kind_name, chunk) in enumerate(blocks):
            acc += chunk
            dest.write_text(acc, encoding="utf-8")
            _git(repo, "add", str(rel))
            subject = "Add {} module".format(rel.with_suffix("").as_posix().replace("/", " ")) \
                if i == 0 and len(blocks) == 1 else _subject(kind_name, step)
            body = f"{subject}\n\nPart {i + 1} of {len(blocks)} of {rel.as_posix()}.\n"
            date = f"{t + 3600 * step} +0000"
            _git(repo, "commit", "-q", "--no-verify", "-m", body,
                 env={"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
            step += 1
    marker.write_text(f"{step} commits\n")
    return repo
