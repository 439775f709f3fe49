"""Shared test helper: where the HumanEvalPack data (<lang>.jsonl) is, for the tests/test_eval_*.py files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve()


def humanevalpack_dir() -> Path:
    """$MEGAOCTO_HUMANEVALPACK, else ``shared/data/humanevalpack`` next to or inside the checkout, else the
    project machines' copy under /work/shared: the first that holds ``python.jsonl``. Skips the calling test
    (naming the variable to set) when there is none."""
    for cand in (os.environ.get("MEGAOCTO_HUMANEVALPACK"), _HERE.parents[2] / "shared/data/humanevalpack",
                 _HERE.parents[1] / "shared/data/humanevalpack", Path("/work/shared/data/humanevalpack")):
        if cand and (Path(cand) / "python.jsonl").exists():
            return Path(cand)
    pytest.skip("HumanEvalPack data not found: set MEGAOCTO_HUMANEVALPACK to a directory with <lang>.jsonl")
