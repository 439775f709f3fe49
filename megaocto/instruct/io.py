"""jsonl in and out for the instruct stages: reading through megaocto.data.jsonl (``file:line`` errors), writing
whole files atomically (a temp file renamed into place)."""
from __future__ import annotations

import os
from typing import Iterable, Iterator

from megaocto.data.jsonl import iter_jsonl, write_jsonl_row


def read_jsonl(path: str, required_keys: Iterable[str] = ()) -> Iterator[dict]:
    """Rows of ``path``; a bad row or a missing required key is a ValueError ``"path:line: reason"``."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    yield from iter_jsonl(path, tuple(required_keys), "fail")


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write ``rows`` to ``path`` atomically; returns the number of rows."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            write_jsonl_row(f, row)
            n += 1
    os.replace(tmp, path)
    return n
