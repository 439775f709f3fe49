"""Decontamination: planted HumanEvalPack solutions and docstrings (any language, any case) are removed with the
benchmark and matched string reported; near misses and upstream's generic solutions are kept; the Aho-Corasick
matcher reports exactly what upstream's nested loop reports; HumanEval docstring extraction; extra jsonl
benchmarks; the CLI writes kept/removed rows and the report.
"""
import json
import os
import random

import pytest

from megaocto.eval.humanevalpack import load_problems
from megaocto.instruct.decontaminate import (HUMAN_EVAL_STRINGS_OK, Decontaminator, extract_docstring,
                                             load_benchmarks, naive_find)

HEP = "/work/shared/data/humanevalpack"


@pytest.fixture(scope="module")
def benchmarks():
    return load_benchmarks(humanevalpack=HEP)


def _row(i, problem, solution):
    return {"index": i, "lang": "python", "problem": problem, "solution": solution}


def test_planted_contamination_removed_near_misses_kept(benchmarks, tmp_path):
    from megaocto.cli import main

    py, rust = load_problems("python", HEP), load_problems("rust", HEP)
    sol = py[10]["canonical_solution"].strip()
    doc = extract_docstring(py[20]["prompt"])
    rust_doc = rust[30]["docstring"].strip()
    filler = "Write a program that reads numbers and prints their sum.\n"
    rows = [
        _row(0, filler, "Here it is:\n```python\n" + sol + "\n```"),              # HumanEval solution
        _row(1, "Implement f.\n" + doc.upper(), "pass"),                          # docstring, other case
        _row(2, filler, "fn main() {}\n// " + rust_doc),                          # HumanEvalPack rust docstring
        _row(3, filler, sol.replace("return", "retrun", 1)),                      # near miss: one word changed
        _row(4, doc[: len(doc) // 2] + " ... and more", "pass"),                  # near miss: half a docstring
        _row(5, filler, "def add(x, y):\n    return x + y\n"),                    # generic solution, kept upstream
        _row(6, filler, "print('hello')"),
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, removed, report = (str(tmp_path / n) for n in ("kept.jsonl", "removed.jsonl", "report.json"))
    assert main(["instruct", "decontaminate", "--inputs", str(src), "--output", out, "--removed", removed,
                 "--humanevalpack", HEP, "--report", report]) == 0
    kept = [json.loads(x) for x in open(out)]
    gone = [json.loads(x) for x in open(removed)]
    assert [r["index"] for r in kept] == [3, 4, 5, 6] and [r["index"] for r in gone] == [0, 1, 2]
    assert gone[0]["filter_reason"] == "humaneval_solutions_match" and gone[0]["matched_substring"] == sol
    assert gone[1]["filter_reason"] == "humaneval_docstrings_match" and gone[1]["matched_substring"] == doc
    assert gone[2]["filter_reason"] == "humanevalpack_docstrings_match"
    rep = json.load(open(report))
    assert rep["removed"] == 3 and rep["removed_per_benchmark"]["humaneval_solutions"] == 1
    assert rep["strings_per_benchmark"]["humaneval_docstrings"] == 164
    assert "return x + y" not in benchmarks["humaneval_solutions"]


def test_matcher_equals_upstream_loop(benchmarks):
    dec = Decontaminator(benchmarks)
    rng = random.Random(0)
    strings = [s for v in benchmarks.values() for s in v]
    texts = []
    for i in range(300):
        parts = [rng.choice(["x = 1", "for i in range(3):", "hello world", "return"]) for _ in range(5)]
        if i % 3 == 0:  # plant one or two benchmark strings, sometimes cut short
            for _ in range(1 + i % 2):
                s = rng.choice(strings)
                parts.insert(rng.randrange(len(parts)), s if i % 2 else s[: max(1, len(s) - 1)])
        texts.append("\n".join(parts).lower())
    found = 0
    for t in texts:
        a, b = dec.find(t), naive_find(t, benchmarks)
        assert (a is None) == (b is None) and (a is None or (a.benchmark, a.substring) == (b.benchmark, b.substring))
        found += a is not None
    assert found >= 50


def test_docstring_extraction_and_extra_benchmark(tmp_path):
    assert extract_docstring('def f():\n    """ Doc. """\n') == "Doc."
    assert extract_docstring('"""a"""\ndef f():\n    """ B """\n') == "B"
    assert extract_docstring("def f():\n    ''' c '''\n") == "c"
    with pytest.raises(ValueError):
        extract_docstring("def f(): pass")
    assert HUMAN_EVAL_STRINGS_OK[3] == "return .join(strings)"  # upstream's literal, concatenated by Python
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"text": "Write a function to find the shared elements.", "code": "  "}) + "\n")
    b = load_benchmarks(humanevalpack=HEP, humanevalpack_langs=["python"], extra=[f"mbpp={mbpp}:text,code"])
    assert b["mbpp"] == ["Write a function to find the shared elements."]
    with pytest.raises(ValueError, match="NAME=FILE:field"):
        load_benchmarks(humanevalpack=HEP, humanevalpack_langs=["python"], extra=["mbpp"])
    m = Decontaminator(b).find("so: write a function to find the shared elements. ok")
    assert m.benchmark == "mbpp"
