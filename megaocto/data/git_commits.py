"""Single-file commits of a local git repository as CommitPack-schema jsonl (git via subprocess only).

``git log --raw -z -M`` lists each non-merge commit's changed paths; one ``git cat-file --batch-command``
process serves sizes, blobs and commit objects. A commit becomes a row when it touches exactly one path that
is a regular file, added (A), modified (M, content changed) or renamed (R), maps to a CommitPack language, is at
most ``max_file_bytes`` on both sides, has no NUL byte and is valid UTF-8. Everything else is counted by
reason, never a crash. Contents are kept exactly as stored (CRLF, a UTF-8 BOM).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Iterator

from megaocto.config.base import ConfigError, field

ROW_KEYS = ("commit", "old_file", "new_file", "old_contents", "new_contents", "subject", "message", "lang",
            "license", "repos")
_REGULAR = ("100644", "100755")


@dataclass
class CommitsConfig:
    rev: str = field("HEAD", "Revision whose history is walked (git log REV), e.g. HEAD, main, v1.0..HEAD.")
    max_file_bytes: int = field(204_800, "Skip a commit whose file is larger than this on either side (bytes).")
    renames: bool = field(True, "Detect renames (-M) and keep renamed files as rows with old_file != new_file.")
    additions: bool = field(True, "Keep commits that add the file (old_contents = '').")
    license: str | None = field(None, "License id for every row; None = detect from LICENSE/COPYING at REV.")
    repo_name: str | None = field(None, "owner/name for `repos`; None = from the origin remote, else the dir.")
    max_rows: int | None = field(None, "Stop after this many rows (newest first).")


def load_languages() -> list[tuple[str, str]]:
    """(suffix, language) pairs from CommitPack's extension table, longest suffix first."""
    table = json.loads(resources.files("megaocto").joinpath("resources", "commitpack-languages.json")
                       .read_text(encoding="utf-8"))
    pairs = [(ext, lang) for lang, exts in table.items() for ext in exts]
    return sorted(pairs, key=lambda p: -len(p[0]))


def language_of(path: str, languages: list[tuple[str, str]]) -> str | None:
    """CommitPack language by the longest case-sensitive suffix of ``path`` (None if unmapped)."""
    for ext, lang in languages:
        if path.endswith(ext):
            return lang
    return None


class GitError(RuntimeError):
    """A git command failed; the message includes the command and git's stderr."""


def _git(repo: str, *args: str) -> bytes:
    proc = subprocess.run(["git", "-C", repo, *args], capture_output=True)
    if proc.returncode:
        raise GitError(f"git {' '.join(args)} in {repo} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


class _CatFile:
    """One ``git cat-file --batch-command`` process: object sizes and contents on demand."""

    def __init__(self, repo: str):
        self._p = subprocess.Popen(["git", "-C", repo, "cat-file", "--batch-command"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE)

    def _header(self, cmd: str, sha: str) -> tuple[str, int]:
        self._p.stdin.write(f"{cmd} {sha}\n".encode())
        self._p.stdin.flush()
        head = self._p.stdout.readline().split()
        if len(head) != 3:
            raise GitError(f"git cat-file: object {sha} is missing ({b' '.join(head).decode(errors='replace')})")
        return head[1].decode(), int(head[2])

    def size(self, sha: str) -> int:
        return self._header("info", sha)[1]

    def contents(self, sha: str) -> bytes:
        _, size = self._header("contents", sha)
        data = self._p.stdout.read(size)
        self._p.stdout.read(1)  # trailing LF
        return data

    def close(self):
        if self._p.stdin:
            self._p.stdin.close()
        self._p.wait()


@dataclass
class _Change:
    status: str
    old_mode: str
    new_mode: str
    old_sha: str
    new_sha: str
    old_path: str
    new_path: str


def _log_entries(repo: str, cfg: CommitsConfig) -> Iterator[tuple[str, list[str], list[_Change]]]:
    """(sha, parents, changes) per non-merge commit, newest first, streamed from one git log."""
    args = ["git", "-C", repo, "log", "--no-merges", "--raw", "--no-abbrev", "-z", "--format=%x01%H %P",
            "-M" if cfg.renames else "--no-renames", cfg.rev, "--"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    buf, finished = b"", False
    try:
        while True:
            block = proc.stdout.read(1 << 16)
            if not block:
                break
            buf += block
            *complete, buf = buf.split(b"\x01")
            for part in complete:
                if part.strip(b"\x00\n"):
                    yield _parse_entry(part)
        if buf.strip(b"\x00\n"):
            yield _parse_entry(buf)
        finished = True
    finally:
        if not finished:
            proc.kill()
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        if proc.wait() != 0 and finished:
            raise GitError(f"git log {cfg.rev} in {repo} failed: {err.decode(errors='replace').strip()}")


def _parse_entry(part: bytes) -> tuple[str, list[str], list[_Change]]:
    head, _, rest = part.partition(b"\n")
    ids = head.replace(b"\x00", b" ").decode().split()
    tokens = [t for t in rest.split(b"\x00")]
    changes, i = [], 0
    while i < len(tokens):
        tok = tokens[i].lstrip(b"\n")
        if not tok.startswith(b":"):
            i += 1
            continue
        old_mode, new_mode, old_sha, new_sha, status = tok[1:].decode().split(" ")
        if status[0] in "RC":
            old_path, new_path = tokens[i + 1], tokens[i + 2]
            i += 3
        else:
            old_path = new_path = tokens[i + 1]
            i += 2
        changes.append(_Change(status[0], old_mode, new_mode, old_sha, new_sha,
                               old_path.decode("utf-8", "surrogateescape"),
                               new_path.decode("utf-8", "surrogateescape")))
    return ids[0], ids[1:], changes


def _decode_message(raw: bytes) -> tuple[str, bool]:
    """(message, was_valid) from a raw commit object, honouring its ``encoding`` header."""
    headers, _, body = raw.partition(b"\n\n")
    enc = "utf-8"
    for line in headers.split(b"\n"):
        if line.startswith(b"encoding "):
            enc = line[9:].decode("ascii", "replace").strip()
    try:
        return body.decode(enc), True
    except (UnicodeDecodeError, LookupError):
        try:
            return body.decode("utf-8"), True
        except UnicodeDecodeError:
            return body.decode("utf-8", "replace"), False


_LICENSE_PATTERNS = [
    (r"Apache License,?\s+Version 2\.0", "apache-2.0"), (r"MIT License|Permission is hereby granted, free of charge",
                                                         "mit"),
    (r"GNU AFFERO GENERAL PUBLIC LICENSE\s+Version 3", "agpl-3.0"),
    (r"GNU LESSER GENERAL PUBLIC LICENSE\s+Version 3", "lgpl-3.0"),
    (r"GNU GENERAL PUBLIC LICENSE\s+Version 3", "gpl-3.0"), (r"GNU GENERAL PUBLIC LICENSE\s+Version 2", "gpl-2.0"),
    (r"Mozilla Public License,? (v\. |Version )?2\.0", "mpl-2.0"), (r"unlicense\.org|This is free and unencumbered",
                                                                    "unlicense"),
    (r"Redistribution and use in source and binary forms.*Neither the name", "bsd-3-clause"),
    (r"Redistribution and use in source and binary forms", "bsd-2-clause"), (r"ISC License", "isc"),
]


def detect_license(repo: str, rev: str = "HEAD") -> str:
    """Lowercase SPDX-like id from LICENSE*/COPYING* at ``rev`` ("unknown" if none matches)."""
    try:
        names = _git(repo, "ls-tree", "--name-only", rev).decode("utf-8", "replace").splitlines()
    except GitError:
        return "unknown"
    for name in sorted(n for n in names if re.match(r"(?i)^(licen[cs]e|copying)", n)):
        try:
            text = _git(repo, "show", f"{rev}:{name}").decode("utf-8", "replace")
        except GitError:
            continue
        for pattern, spdx in _LICENSE_PATTERNS:
            if re.search(pattern, text, re.IGNORECASE | re.DOTALL):
                return spdx
    return "unknown"


def detect_repo_name(repo: str) -> str:
    """``owner/name`` from the origin remote URL, else the directory name."""
    try:
        url = _git(repo, "remote", "get-url", "origin").decode().strip()
        m = re.search(r"[:/]([^/:]+)/([^/]+?)(?:\.git)?/?$", url)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    except GitError:
        pass
    return os.path.basename(os.path.abspath(repo))


class CommitExtractor:
    """Iterate CommitPack rows of ``repo``; ``counts`` says how many commits were kept/skipped and why."""

    def __init__(self, repo: str, cfg: CommitsConfig | None = None):
        self.repo, self.cfg = repo, cfg or CommitsConfig()
        if not os.path.isdir(repo):
            raise ConfigError(f"{repo} is not a directory")
        top = _git(repo, "rev-parse", "--show-toplevel").decode().strip()
        self.repo = top
        self.languages = load_languages()
        self.license = self.cfg.license or detect_license(top, self.cfg.rev)
        self.repo_name = self.cfg.repo_name or detect_repo_name(top)
        for what, value in (("license", self.license), ("repo name", self.repo_name)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"the {what} {value!r} is not valid UTF-8 text; pass --{what.replace(' ', '-')} "
                                  f"with a UTF-8 value") from None
        self.counts: Counter = Counter()

    def _skip(self, reason: str) -> None:
        self.counts[f"skipped: {reason}"] += 1

    def __iter__(self) -> Iterator[dict]:
        cat = _CatFile(self.repo)
        try:
            written = 0
            for sha, parents, changes in _log_entries(self.repo, self.cfg):
                self.counts["commits"] += 1
                row = self._row(cat, sha, parents, changes)
                if row is not None:
                    written += 1
                    self.counts["rows"] += 1
                    yield row
                    if self.cfg.max_rows and written >= self.cfg.max_rows:
                        break
        finally:
            cat.close()

    def _row(self, cat: _CatFile, sha: str, parents: list[str], changes: list[_Change]) -> dict | None:
        if len(changes) != 1:
            self._skip("no file changes" if not changes else "multi-file commit")
            return None
        ch = changes[0]
        if ch.status == "D":
            return self._skip("deleted file")
        if ch.status == "A" and not self.cfg.additions:
            return self._skip("added file")
        if ch.status not in "AMR":
            return self._skip(f"status {ch.status}")
        if ch.new_mode not in _REGULAR or (ch.status != "A" and ch.old_mode not in _REGULAR):
            return self._skip("symlink or submodule")
        if ch.status == "M" and ch.old_sha == ch.new_sha:
            return self._skip("mode-only change")
        try:
            ch.old_path.encode("utf-8"), ch.new_path.encode("utf-8")
        except UnicodeEncodeError:
            return self._skip("non-UTF-8 path")
        lang = language_of(ch.new_path, self.languages)
        if lang is None:
            return self._skip("no CommitPack language for the path")
        has_old = ch.status != "A"
        sizes = [cat.size(ch.new_sha)] + ([cat.size(ch.old_sha)] if has_old else [])
        if max(sizes) > self.cfg.max_file_bytes:
            return self._skip(f"file over {self.cfg.max_file_bytes} bytes")
        new_raw = cat.contents(ch.new_sha)
        old_raw = cat.contents(ch.old_sha) if has_old else b""
        if b"\x00" in new_raw or b"\x00" in old_raw:
            return self._skip("binary file")
        try:
            new, old = new_raw.decode("utf-8"), old_raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._skip("non-UTF-8 file")
        if ch.status == "R" and old == new:
            self.counts["renamed without change (kept)"] += 1
        message, ok = _decode_message(cat.contents(sha))
        if not ok:
            self.counts["non-UTF-8 message (replaced chars, kept)"] += 1
        if "\r\n" in new or "\r\n" in old:
            self.counts["CRLF contents (kept as is)"] += 1
        if ch.status == "R":
            self.counts["renames (kept)"] += 1
        subject = message.split("\n", 1)[0]
        if subject.endswith("\r"):
            subject = subject[:-1]
        return {"commit": sha, "old_file": ch.old_path, "new_file": ch.new_path, "old_contents": old,
                "new_contents": new, "subject": subject, "message": message, "lang": lang,
                "license": self.license, "repos": self.repo_name}


def extract_commits(repo: str, output: str, cfg: CommitsConfig | None = None) -> CommitExtractor:
    """Write the single-file commits of ``repo`` to ``output`` (jsonl); returns the extractor (``counts``)."""
    from megaocto.data.jsonl import UnencodableRowError, write_jsonl_row

    ex = CommitExtractor(repo, cfg)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in ex:
                try:
                    write_jsonl_row(f, row)
                except UnencodableRowError as e:  # the extractor checks what it reads; counted, never a crash
                    ex.counts["rows"] -= 1
                    ex.counts[f"skipped: {e.category} in {e.key}"] += 1
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, output)
    return ex
