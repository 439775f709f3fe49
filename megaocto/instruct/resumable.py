"""Resumable, append-only jsonl output keyed by index, plus ``--shard K/N`` and the shard merge.

A run writes two files and a sidecar:

* ``OUT`` — kept rows (each has an integer ``index``), appended and flushed one whole line at a time;
* ``OUT.rejected.jsonl`` — rows that were processed but not kept (``index`` + ``reason`` + what was seen), so that a
  rerun neither redoes nor loses them;
* ``OUT.run.json`` — ``{"fingerprint", "settings", "shard", "expected", "complete"}``; the fingerprint is a sha256
  over every setting that changes the result.

Rerunning the same command reads both files, drops a torn last line (a kill in the middle of a write), and skips
every index already present. A different fingerprint is an error (a new ``--output`` is needed), never a silent mix.
Rows that failed for a transient reason (a teacher that never answered) are written nowhere, so the rerun retries
them; ``complete`` becomes true only when every expected index is in one of the two files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable

from megaocto.data.jsonl import UnencodableRowError, encode_row, write_jsonl_row


class ResumeError(ValueError):
    """Existing output that cannot be continued (other settings, foreign file, incomplete shard)."""


def fingerprint(*parts) -> str:
    """sha256 hex of the JSON of ``parts`` (sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with ``0 <= K < N``; None → ``(0, 1)``."""
    if spec is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard must be K/N with 0 <= K < N, e.g. 0/8 (got {spec!r})")
    return int(m.group(1)), int(m.group(2))


def shard_path(output: str, shard: tuple[int, int]) -> str:
    """The file a shard writes: ``out.jsonl`` → ``out.shard-3-of-8.jsonl`` (unsharded: ``output`` itself)."""
    k, n = shard
    if n == 1:
        return output
    stem, ext = os.path.splitext(output)
    return f"{stem}.shard-{k}-of-{n}{ext or '.jsonl'}"


def in_shard(index: int, shard: tuple[int, int]) -> bool:
    return index % shard[1] == shard[0]


def rejected_path(path: str) -> str:
    return path + ".rejected.jsonl"


def run_path(path: str) -> str:
    return path + ".run.json"


def read_rows(path: str, *, repair: bool = False) -> list[dict]:
    """Rows of a jsonl output. A last line without its newline is a torn write (a kill mid-write): dropped, and
    truncated away when ``repair``. Any complete bad line is an error naming file and line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    if torn and repair:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(torn))
    rows = []
    for n, raw in enumerate(lines, 1):
        try:
            row = json.loads(raw)
            if not isinstance(row, dict) or not isinstance(row.get("index"), int):
                raise ValueError("not an object with an integer 'index'")
        except ValueError as e:
            raise ResumeError(f"{path}:{n}: bad output row ({e}); the file was not written by this tool or was "
                              f"edited") from None
        rows.append(row)
    return rows


class ResumableOutput:
    """See the module doc. ``done`` holds the indices already processed (kept or rejected)."""

    def __init__(self, path: str, fp: str, settings: dict, shard: tuple[int, int] = (0, 1)):
        self.path, self.fingerprint, self.settings, self.shard = path, fp, settings, shard
        meta_path = run_path(path)
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("fingerprint") != fp:
                old = meta.get("settings", {})
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ResumeError(f"{path}: written by a run with other settings (differs in: "
                                  f"{', '.join(diff) or 'the prompt/tool version'}); continue with the same settings "
                                  f"or choose a new --output")
        elif os.path.exists(path) and os.path.getsize(path) > 0:
            raise ResumeError(f"{path}: exists but has no {os.path.basename(meta_path)}; it was not written by this "
                              f"tool (choose a new --output)")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = read_rows(path, repair=True)
        rejected = read_rows(rejected_path(path), repair=True)
        self.done = {r["index"] for r in kept} | {r["index"] for r in rejected}
        self.resumed_kept, self.resumed_rejected = len(kept), len(rejected)
        self._write_meta(expected=None, complete=False)
        self._out = open(path, "a", encoding="utf-8")
        self._rej = open(rejected_path(path), "a", encoding="utf-8")

    def _write_meta(self, *, expected, complete) -> None:
        meta = {"fingerprint": self.fingerprint, "settings": self.settings, "shard": list(self.shard),
                "expected": expected, "complete": complete}
        tmp = run_path(self.path) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, default=str)
        os.replace(tmp, run_path(self.path))

    def write(self, row: dict, *, kept: bool) -> bool:
        """Append the row (kept or rejected); returns whether it was kept. A row holding a string that is not valid
        Unicode (a lone surrogate from a teacher's JSON escape) is written as rejected with reason "unencodable"."""
        if row["index"] in self.done:
            raise ValueError(f"index {row['index']} written twice")  # a bug, never silently duplicated
        try:
            line = encode_row(row)
        except UnencodableRowError as e:
            kept, line = False, encode_row({"index": row["index"], "reason": "unencodable", "error": str(e)})
        f = self._out if kept else self._rej
        f.write(line)
        f.flush()
        self.done.add(row["index"])
        return kept

    def close(self, expected: Iterable[int]) -> bool:
        """Close the files and record whether every ``expected`` index is done; returns that."""
        self._out.close()
        self._rej.close()
        expected = set(expected)
        complete = expected <= self.done
        self._write_meta(expected=len(expected), complete=complete)
        return complete


def merge_shards(output: str, num_shards: int, *, sort_key: str = "index") -> dict:
    """Check that every shard of ``output`` is complete with one fingerprint, then write ``output`` (and its
    rejected file) with the rows of all shards sorted by ``index``. Returns counts."""
    metas, missing = [], []
    for k in range(num_shards):
        path = shard_path(output, (k, num_shards))
        if not os.path.exists(run_path(path)):
            missing.append(f"{path} (never started)")
            continue
        with open(run_path(path), encoding="utf-8") as f:
            meta = json.load(f)
        if not meta.get("complete"):
            missing.append(f"{path} (incomplete: rerun shard {k}/{num_shards})")
        metas.append(meta)
    if missing:
        raise ResumeError("cannot merge, shards not complete:\n  " + "\n  ".join(missing))
    # each shard names its own shard (and, for a later stage, its own shard of the previous stage's output)
    settings = [{k: v for k, v in m["settings"].items() if k not in ("shard", "input")} for m in metas]
    if any(s != settings[0] for s in settings):
        raise ResumeError(f"cannot merge {output}: the shards were run with different settings")
    kept, rejected = [], []
    for k in range(num_shards):
        path = shard_path(output, (k, num_shards))
        kept += read_rows(path)
        rejected += read_rows(rejected_path(path))
    kept.sort(key=lambda r: r[sort_key])
    rejected.sort(key=lambda r: r[sort_key])
    for path, rows in ((output, kept), (rejected_path(output), rejected)):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:  # read back from our own shard files: always encodable
                write_jsonl_row(f, r)
        os.replace(tmp, path)
    return {"shards": num_shards, "kept": len(kept), "rejected": len(rejected)}
