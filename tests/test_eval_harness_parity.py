"""Programs are built and judged as bigcode-evaluation-harness builds and judges them (docs/eval.md, "Harness
parity"): the Go program construction of ``humanevalpack.py`` (test_setup + an import block of the packages used
anywhere in the program, test included + the candidate as written + test), ``go test``'s ``-test.paniconexit0``,
and early exits: a Python or Go program that exits with status 0 before its tests ran fails, as in the harness;
in JavaScript, Java, C++ and Rust the harness passes such a program (exit status 0, no output) and so does megaocto.
"""
from __future__ import annotations

import pytest

from eval_data import humanevalpack_dir
from megaocto.eval import humanevalpack as hep
from megaocto.eval.execute import Executor
from megaocto.eval.toolchains import ToolchainError, prepare


def _executor(lang: str, **kw) -> Executor:
    try:
        prepare(lang)
    except ToolchainError as e:
        pytest.skip(str(e))
    return Executor(lang, **kw)


def _problem(lang: str, task_id: str) -> dict:
    return next(p for p in hep.load_problems(lang, humanevalpack_dir()) if p["task_id"] == task_id)


# ------------------------------------------------------------------------------------------------------------ Go
GO_SETUP = 'package main\n\nimport (\n    "testing"\n    "github.com/stretchr/testify/assert"\n)\n'


def test_go_program_text_is_the_harness_construction():
    """The exact text: test_setup + "\\n", an import block of the harness's packages named (outside // comment
    lines) anywhere in setup + candidate + test and not already quoted there, the candidate as written (its own
    import block kept), "\\n", the reference ("\\n" + test)."""
    test = "func TestF(t *testing.T) {\n    assert := assert.New(t)\n    assert.Equal(true, math.Abs(F(1)) < 2)\n}\n"
    problem = {"task_id": "Go/0", "test_setup": GO_SETUP, "test": test}
    code = 'import (\n    "strings"\n)\n\n// fmt.Println in a comment imports nothing\nfunc F(x float64) float64 {\n' \
           '    return x + float64(len(strings.Fields(strconv.Itoa(1))))\n}'
    expected = (GO_SETUP + "\n" + 'import (\n    "math"\n    "strconv"\n)\n' + code + "\n" + "\n" + test)
    assert hep.build_program("go", code, problem) == expected
    # the candidate's own "testing" import drops that line from test_setup; its "package main" goes
    code2 = 'package main\n\nimport (\n    "testing"\n)\n\nfunc F(x float64) float64 { return x }'
    prog = hep.build_program("go", code2, problem)
    setup_without_testing = GO_SETUP.replace('"testing"', "") + "\n"
    assert prog == (setup_without_testing + 'import (\n    "math"\n)\n' + code2.replace("package main", "") + "\n\n"
                    + test)
    # math/rand and crypto/md5 are added under their last path element, as the harness does ("rand", "md5")
    prog = hep.build_program("go", "func F() int { return rand.Intn(2) }", {**problem, "test": "func TestF(t *testing.T) {}\n"})
    assert 'import (\n    "rand"\n)\n' in prog


@pytest.mark.parametrize("task_id", ["Go/2", "Go/4", "Go/44", "Go/151"])
def test_go_packages_used_by_the_test_are_imported(task_id):
    """Go/2, Go/4, Go/44, Go/151: the test itself uses math / strconv. The canonical solution passes on the
    synthesize path (the prompt's import block) and the fix-tests path (declaration only: no import block)."""
    problem = _problem("go", task_id)
    for task in ("synthesize", "fix-tests"):
        gens = hep.canonical_generations(task, "go", [problem])
        res = hep.evaluate(task, "go", gens, problems=[problem], workers=1)
        sample = res.problems[0]["samples"][0]
        assert sample["passed"], (task, sample["status"], sample["detail"][:500])


def test_go_correct_candidate_that_does_not_use_the_tests_package_passes():
    """Go/2's test calls math.Abs; a correct candidate without math must still compile (the harness imports what the
    test uses; the synthesize prompt's own `import ("math")` block stays)."""
    problem = _problem("go", "Go/2")
    body = "    return number - float64(int(number))\n}\n"
    ex = _executor("go")
    for task in ("synthesize", "fix-tests"):
        head = problem["prompt"] if task == "synthesize" else problem["declaration"]
        res = ex.run(hep.build_program("go", head.rstrip() + "\n" + body, problem))
        assert res.passed, (task, res.status, res.detail[:500])


def test_go_candidate_with_an_unused_import_fails_to_compile():
    """The harness keeps the candidate's own import block: an unused package is Go's "imported and not used"."""
    problem = _problem("go", "Go/2")
    code = 'import (\n    "math"\n    "sort"\n)\n' + problem["declaration"] + problem["canonical_solution"]
    res = _executor("go").run(hep.build_program("go", code, problem))
    assert not res.passed and res.status == "compile_error" and "imported and not used" in res.detail


def test_go_os_exit_zero_in_a_test_fails():
    """`go test` runs the test binary with -test.paniconexit0: os.Exit(0) during a test panics."""
    problem = _problem("go", "Go/2")
    code = 'import (\n    "os"\n)\n' + problem["declaration"] + "    os.Exit(0)\n    return 0\n}\n"
    res = _executor("go").run(hep.build_program("go", code, problem))
    assert not res.passed and "os.Exit(0)" in res.detail, (res.status, res.detail[:500])
    ok = _executor("go").run(hep.build_program("go", problem["declaration"] + problem["canonical_solution"], problem))
    assert ok.passed, ok.detail[:500]


# -------------------------------------------------------------------------------------------------------- Python
PY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "exit()": "exit()\n",
    "quit()": "quit()\n",
    "raise SystemExit": "raise SystemExit\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
}


@pytest.fixture(scope="module")
def py():
    return _executor("python", timeout=10)


@pytest.mark.parametrize("name", sorted(PY_EXITS))
def test_python_exit_before_the_asserts_fails(py, name):
    """The harness exec()s the program and passes it only when exec returns: SystemExit is a failure, exit/quit are
    None (reliability_guard), os._exit leaves no result (scored as a timeout)."""
    program = "def f():\n    return 1\n" + PY_EXITS[name] + "assert f() == 2\n"
    res = py.run(program)
    assert not res.passed and res.status == "failed", (name, res.status, res.detail)


def test_python_exit_inside_the_candidate_fails_and_a_real_pass_passes(py):
    problem = _problem("python", "Python/2")
    cheat = problem["prompt"] + "    import sys\n    sys.exit(0)\n"
    assert not py.run(hep.build_program("python", cheat, problem)).passed
    good = problem["prompt"] + problem["canonical_solution"]
    res = py.run(hep.build_program("python", good, problem))
    assert res.passed, res.detail
    # output and reading stdin behave as in the harness (swallowed; reading raises OSError)
    assert py.run("print('x' * 100)\nassert True\n").passed
    assert not py.run("input()\n").passed


# ------------------------------------------------------------------------------- the other languages: as the harness
def test_js_java_cpp_rust_early_exit_zero_passes_as_in_the_harness():
    """The harness passes these: js `node test.js` with exit 0 and no output, java/cpp/rust exit status 0
    (`java -cp . Main`, `./a.out`, `cargo test`). megaocto scores them the same way."""
    cases = {
        "js": ("JavaScript/2", "const truncateNumber = (number) => {\n  process.exit(0);\n}\n"),
        "java": ("Java/2", None),
        "cpp": ("CPP/2", "#include<stdio.h>\n#include<math.h>\nusing namespace std;\n"
                         "float truncate_number(float number){\n    exit(0);\n}\n"),
        "rust": ("Rust/2", "fn main(){}\nfn truncate_number(number: &f32) -> f32{\n    std::process::exit(0);\n}\n"),
    }
    ran = 0
    for lang, (task_id, code) in cases.items():
        try:
            prepare(lang)
        except ToolchainError:
            continue
        problem = _problem(lang, task_id)
        if lang == "java":
            code = problem["declaration"] + "        System.exit(0);\n        return 0;\n    }\n}\n"
        res = Executor(lang).run(hep.build_program(lang, code, problem))
        assert res.passed, (lang, res.status, res.detail[:500])
        ran += 1
    if ran == 0:
        pytest.skip("no JS/Java/C++/Rust toolchain")


def test_js_verdict_is_the_harness_silence_rule():
    """JS passes iff stdout and stderr are both empty, whatever the exit status (`node test.js` in the harness):
    a silent non-zero exit passes, a lone newline fails; a failing console.assert prints and fails."""
    js = _executor("js", timeout=10)
    assert js.run("process.exit(3)\n").passed
    assert not js.run("console.log()\n").passed
    res = js.run("console.assert(1 === 2)\n")
    assert not res.passed and "Assertion failed" in res.detail
    assert not js.run("throw new Error('boom')\n").passed
