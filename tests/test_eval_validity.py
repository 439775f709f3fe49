"""Harness validity: every canonical solution passes and every buggy solution fails, through the same
prompt -> post-processing -> program -> sandbox path a model's output takes.

All 164 problems for Python and JavaScript; a fixed sample of 10 for Java, C++, Go and Rust (the full 984-problem
run is `bench/eval_bench.py`; its results are in docs/eval.md). Known exceptions are listed in KNOWN with the reason.
"""
from __future__ import annotations

import random

import pytest

from eval_data import humanevalpack_dir
from megaocto.eval import humanevalpack as hep
from megaocto.eval.toolchains import ToolchainError, check, prepare

SAMPLE = 10
FULL = ("python", "js")
# problem -> why it cannot pass here (see docs/eval.md); excluded from the canonical check only
KNOWN: dict[str, str] = {
    "Rust/32": "calls rand 0.4's gen_range(low, high); Debian ships only rand 0.8 and crates.io is offline",
    "Rust/50": "the same rand 0.4 gen_range(low, high) call",
    "Go/27": "its prompt imports \"strings\", which the reference solution does not use: the harness keeps the "
             "candidate's import block, so the program fails to compile (\"imported and not used\") there and here",
}


# the harness's post-processing cuts these reference solutions (a model writing the same code is cut the same way):
# Go's stop words "\nfunc" (a helper after the function) and "struct" (map[int]struct{}); Rust's remove_last_block
# stops at the function's closing brace (a helper or type defined after it)
CUT_BY_POSTPROCESSING = ("Go/72", "Go/90", "Go/158", "Rust/137", "Rust/145")
# buggy solutions the dataset's own tests cannot catch
KNOWN_BUGGY: dict[str, str] = {
    "CPP/23": "the test calls strlen on string literals, which resolves to C's strlen, not the candidate's",
}


def _problems(lang: str) -> list[dict]:
    problems = hep.load_problems(lang, humanevalpack_dir())
    if lang in FULL:
        return problems
    picked = sorted(random.Random(8).sample(range(len(problems)), SAMPLE))
    return [problems[i] for i in picked]


@pytest.mark.parametrize("lang", ["python", "js", "java", "cpp", "go", "rust"])
def test_canonical_pass_and_buggy_fail(lang):
    try:
        check(lang)
        prepare(lang)
    except ToolchainError as e:
        pytest.skip(f"{e}")
    if lang == "js" and "node_modules" not in prepare(lang).extra:
        KNOWN["JavaScript/162"] = "needs the npm package js-md5 (launch/setup_toolchains.sh installs it)"
    problems = _problems(lang)
    canonical = hep.canonical_generations("synthesize", lang, problems)
    res = hep.evaluate("synthesize", lang, canonical, problems=problems, workers=2)
    failed = [i for i, p in enumerate(res.problems) if not p["samples"][0]["passed"] and p["task_id"] not in KNOWN]
    # a failure is allowed only where the harness's post-processing cuts the reference solution (documented in
    # CUT_BY_POSTPROCESSING) and the uncut program passes
    if failed:
        sub = [problems[i] for i in failed]
        raw = hep.evaluate("synthesize", lang, hep.canonical_generations("synthesize", lang, sub, post=False),
                           problems=sub, workers=2)
        bad = [f"{p['task_id']}: {p['samples'][0]['status']} {p['samples'][0]['detail'][:300]}"
               for p in raw.problems if not p["samples"][0]["passed"]]
        assert not bad, f"{len(bad)} canonical solutions failed:\n" + "\n".join(bad)
        cut = sorted(set(p["task_id"] for p in sub) - set(CUT_BY_POSTPROCESSING))
        assert not cut, f"post-processing breaks these canonical solutions (undocumented): {cut}"
    # buggy programs only need to fail: a short timeout keeps the ones that loop forever cheap
    buggy = hep.canonical_generations("synthesize", lang, problems, buggy=True)
    res = hep.evaluate("synthesize", lang, buggy, problems=problems, workers=2, timeout=3)
    passing = [p["task_id"] for p in res.problems if p["samples"][0]["passed"] and p["task_id"] not in KNOWN_BUGGY]
    assert not passing, f"buggy solutions passed the tests: {passing}"


def test_fix_and_explain_paths_run_canonical_code():
    """fix-tests / fix-docs / explain-synthesize post-process onto other answer starts than synthesize (declaration,
    docstring prompt, docstring prompt after a declaration-only prompt);
    the canonical body must still pass there (5 problems per path, Python and C++ when available)."""
    for lang in ("python", "cpp"):
        try:
            check(lang)
        except ToolchainError:
            continue
        problems = hep.load_problems(lang, humanevalpack_dir())[:5]
        for task in ("fix-tests", "fix-docs", "explain-synthesize"):
            gens = hep.canonical_generations(task, lang, problems)
            res = hep.evaluate(task, lang, gens, problems=problems, workers=2)
            assert res.metrics["pass@1"] == 1.0, (task, lang, [p["samples"][0]["detail"][:200] for p in res.problems])
