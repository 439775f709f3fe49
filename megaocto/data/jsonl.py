"""Streaming JSON Lines reader with an explicit bad-input policy.

Every physical line is one row. A bad row (invalid UTF-8, truncated/invalid JSON, not an object, a required key
missing / null / not a string or holding an unpaired UTF-16 surrogate escape such as ``"\\ud800"``, an empty
line, a line over ``max_line_bytes``) raises :class:`BadRowError` ``"file:line: reason"`` with
``on_error="fail"``, or is skipped and counted per reason with ``on_error="skip"``. A UTF-8 BOM at the start of
a line is an encoding marker (at the start of the file, or of a file concatenated onto another): it is stripped
and counted, and the row is kept. Valid rows are never dropped.

Writing: :func:`encode_row` / :func:`write_jsonl_row` are the one way megaocto writes jsonl rows. They check
every string of the row (keys and values, nested too) before anything is written, so a row that cannot be UTF-8
encoded raises :class:`UnencodableRowError` naming the key, and never leaves half a line in the output.

Byte ranges (``start``/``end``) let parallel workers each read a contiguous slice of a file: a worker owns
every line whose first byte lies in ``[start, end)``.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

BOM = b"\xef\xbb\xbf"
DEFAULT_MAX_LINE_BYTES = 64 << 20
ON_ERROR = ("fail", "skip")


class BadRowError(ValueError):
    """One input row is malformed; ``str(e)`` is ``"path:line: reason"``."""

    def __init__(self, path: str, line: int, category: str, detail: str = ""):
        self.path, self.line, self.category, self.detail = path, line, category, detail
        super().__init__(f"{path}:{line}: {category}{': ' + detail if detail else ''}")

    # Set by the command that stopped on this row (--on-error fail): the counts up to it, for the summary.
    stats: "JsonlStats | None" = None

    def __reduce__(self):
        return (BadRowError, (self.path, self.line, self.category, self.detail))


@dataclass
class Row:
    path: str
    line: int
    data: dict


@dataclass
class JsonlStats:
    """Counts for a read: rows read (every non-EOF line), rows ok, skipped rows per reason."""

    rows_read: int = 0
    rows_ok: int = 0
    bytes_read: int = 0
    bom_files: int = 0   # BOMs stripped at the start of a file
    bom_lines: int = 0   # BOMs stripped at the start of a later line (files concatenated with cat)
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # first few skipped rows, as BadRowError
    max_examples: int = 5

    def skip(self, err: BadRowError) -> None:
        self.skipped[err.category] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(err)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "JsonlStats") -> None:
        self.rows_read += other.rows_read
        self.rows_ok += other.rows_ok
        self.bytes_read += other.bytes_read
        self.bom_files += other.bom_files
        self.bom_lines += other.bom_lines
        self.skipped.update(other.skipped)
        self.examples.extend(other.examples[: max(0, self.max_examples - len(self.examples))])

    def summary(self, written: int | None = None) -> str:
        parts = [f"rows read {self.rows_read}"]
        if written is not None:
            parts.append(f"written {written}")
        parts.append(f"skipped {self.rows_skipped}")
        text = ", ".join(parts)
        if self.skipped:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.bom_files:
            text += f"; UTF-8 BOM stripped at the start of {self.bom_files} file(s)"
        if self.bom_lines:
            text += (f"; UTF-8 BOM stripped at the start of {self.bom_lines} later line(s) (files concatenated with "
                     f"their BOMs?), rows kept")
        for ex in self.examples:
            text += f"\n  skipped {ex}"
        return text


def _check_keys(path, line, obj, keys, text):
    check_surrogates = "\\ud" in text or "\\uD" in text
    for k in keys:
        if k not in obj:
            raise BadRowError(path, line, "missing key", repr(k))
        v = obj[k]
        if v is None:
            raise BadRowError(path, line, "null key", repr(k))
        if not isinstance(v, str):
            raise BadRowError(path, line, "non-string key", f"{k!r} is {type(v).__name__}, expected a string")
        if check_surrogates:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadRowError(path, line, "lone surrogate",
                                  f"{k!r} has an unpaired UTF-16 surrogate escape at char {e.start}") from None


def parse_line(raw: bytes, path: str, line: int, keys: Iterable[str] = ()) -> dict:
    """Parse one raw line (without regard to the size limit; a leading BOM already stripped); raises
    BadRowError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRowError(path, line, "invalid UTF-8", f"byte 0x{raw[e.start]:02x} at offset {e.start}") from None
    if not text.strip():
        raise BadRowError(path, line, "empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRowError(path, line, "invalid JSON", f"{e.msg} (column {e.colno}; truncated row?)") from None
    if not isinstance(obj, dict):
        raise BadRowError(path, line, "not an object", f"got a JSON {type(obj).__name__}")
    _check_keys(path, line, obj, keys, text)
    return obj


class JsonlReader:
    """Iterate :class:`Row` s of one or more jsonl files (or a byte range of one), applying the policy.

    ``line_offset`` is added to reported line numbers (a range reader counts from its first line).
    ``stats`` accumulates over the whole iteration.
    """

    def __init__(self, paths: Iterable[str], required_keys: Iterable[str] = (), on_error: str = "fail",
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, start: int = 0, end: int | None = None,
                 line_offset: int = 0):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.paths = [os.fspath(p) for p in paths]
        if (start or end is not None) and len(self.paths) != 1:
            raise ValueError("a byte range needs exactly one path")
        self.required_keys = tuple(required_keys)
        self.on_error = on_error
        self.max_line_bytes = max_line_bytes
        self.start, self.end, self.line_offset = start, end, line_offset
        self.stats = JsonlStats()
        self.lines_seen = 0  # lines whose first byte was in range (for line-number bookkeeping)

    def __iter__(self) -> Iterator[Row]:
        for p in self.paths:
            yield from self._iter_file(p)

    def _bad(self, err: BadRowError):
        if self.on_error == "fail":
            raise err
        self.stats.skip(err)

    def _iter_file(self, path: str) -> Iterator[Row]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: input file not found")
        limit = self.max_line_bytes
        stats, keys = self.stats, self.required_keys
        with open(path, "rb", buffering=1 << 20) as f:
            pos, end = self.start, self.end
            if pos > 0:
                f.seek(pos - 1)
                if f.read(1) != b"\n":  # mid-line: that line belongs to the previous range; skip it in pieces
                    while True:
                        piece = f.readline(1 << 20)
                        pos += len(piece)
                        if not piece or piece.endswith(b"\n") or (end is not None and pos >= end):
                            break
            lineno = self.line_offset
            while end is None or pos < end:
                line_start = pos
                raw = f.readline(limit + 1)
                if not raw:
                    break
                pos += len(raw)
                lineno += 1
                self.lines_seen += 1
                stats.rows_read += 1
                stats.bytes_read += len(raw)
                if len(raw) > limit and not raw.endswith(b"\n"):
                    while True:  # consume the rest of the oversized line without holding it
                        more = f.readline(1 << 20)
                        pos += len(more)
                        stats.bytes_read += len(more)
                        if not more or more.endswith(b"\n"):
                            break
                    self._bad(BadRowError(path, lineno, "oversized",
                                          f"line is {pos - line_start} bytes, limit {limit} (--max-line-bytes)"))
                    continue
                if raw.startswith(BOM):  # an encoding marker, not data: at a file's start or a concatenated one's
                    raw = raw[3:]
                    if line_start == 0:
                        stats.bom_files += 1
                    else:
                        stats.bom_lines += 1
                try:
                    obj = parse_line(raw, path, lineno, keys)
                except BadRowError as e:
                    self._bad(e)
                    continue
                stats.rows_ok += 1
                yield Row(path, lineno, obj)


def iter_jsonl(paths, required_keys=(), on_error="fail", **kw) -> Iterator[dict]:
    """Just the row dicts (see :class:`JsonlReader`)."""
    for row in JsonlReader(paths if not isinstance(paths, (str, os.PathLike)) else [paths], required_keys,
                           on_error, **kw):
        yield row.data


class UnencodableRowError(ValueError):
    """A row to write holds a string that is not valid Unicode (an unpaired UTF-16 surrogate, e.g. from a
    ``"\\ud800"`` escape or a ``surrogateescape``-decoded path). ``key`` names the column; ``category`` is the
    counted skip reason."""

    category = "lone surrogate"

    def __init__(self, key: str, position: int):
        self.key, self.position = key, position
        super().__init__(f"{key!r} has an unpaired UTF-16 surrogate at char {position} (not valid UTF-8 text)")


def _check_encodable(value, key: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UnencodableRowError(key, e.start) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_encodable(k, f"{key}.{k}" if key else str(k))
            _check_encodable(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_encodable(v, f"{key}[{i}]")


def encode_row(obj: dict) -> str:
    """One row as CommitPack writes it (UTF-8, non-ASCII raw, LF-terminated), after checking every string in it
    (keys and values, nested too); raises UnencodableRowError naming the first bad key."""
    line = json.dumps(obj, ensure_ascii=False) + "\n"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # rare: find the column to name it
        _check_encodable(obj, "")
        raise
    return line


def write_jsonl_row(f, obj: dict) -> None:
    """Write one row to a text file opened with ``encoding="utf-8"`` (see :func:`encode_row`); a row that
    cannot be encoded raises UnencodableRowError before anything of it is written."""
    f.write(encode_row(obj))
