"""HumanEvalPack prompts (hand-checked against the harness rules), stop words, post-processing, program assembly
and the generations file formats. No programs are executed here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_data import humanevalpack_dir
from megaocto.eval import humanevalpack as hep


@pytest.fixture(scope="module")
def data():
    d = humanevalpack_dir()
    return {lang: hep.load_problems(lang, d) for lang in ("python", "js", "rust", "go", "java")}


def test_load_problems_all_languages_and_errors(tmp_path):
    d = humanevalpack_dir()
    for lang in hep.LANGUAGES:
        problems = hep.load_problems(lang, d)
        assert len(problems) == 164 and problems[0]["task_id"].endswith("/0")
    with pytest.raises(hep.DataError, match="no such file"):
        hep.load_problems("python", tmp_path)
    (tmp_path / "python.jsonl").write_text('{"task_id": "Python/0"}\n')
    with pytest.raises(hep.DataError, match=r"python.jsonl:1: missing HumanEvalPack fields"):
        hep.load_problems("python", tmp_path)


def test_prompts_match_the_harness(data):
    py, js, rs = data["python"][2], data["js"][2], data["rust"][2]
    # FixTests, octocoder: instruction + "\n" + (declaration + buggy + "\n" + test), then the declaration; stripped
    assert hep.build_prompt("fix-tests", py, "octocoder") == (
        "Question: Fix bugs in truncate_number.\ndef truncate_number(number: float) -> float:\n"
        "    return number % 1.0 + 1.0\n\n\n\n\n\n\ndef check(truncate_number):\n"
        "    assert truncate_number(3.5) == 0.5\n    assert abs(truncate_number(1.33) - 0.33) < 1e-6\n"
        "    assert abs(truncate_number(123.456) - 0.456) < 1e-6\n\ncheck(truncate_number)\n\n"
        "Answer:\ndef truncate_number(number: float) -> float:")
    # continue: the bare docstring prompt, stripped (leading blank lines and the trailing newline go)
    assert hep.build_prompt("synthesize", py, "continue") == py["prompt"].strip()
    assert hep.build_prompt("synthesize", py, "continue").endswith('    0.5\n    """')
    # Synthesize octocoder: instruction, no context
    assert hep.build_prompt("synthesize", py, "octocoder") == (
        "Question: Write a Python function `truncate_number(number: float) -> float` to solve the following "
        "problem:\nGiven a positive floating point number, it can be decomposed into\nand integer part (largest "
        "integer smaller than given number) and decimals\n(leftover part always smaller than 1).\nReturn the "
        "decimal part of the number.\n>>> truncate_number(3.5)\n0.5\n\nAnswer:\n\n\ndef truncate_number(number: float) -> "
        "float:\n" + py["prompt"].split("float:\n", 1)[1].rstrip())  # only the whole prompt is stripped
    # ExplainDescribe: the character budget is len(docstring); the answer part is empty
    assert hep.build_prompt("explain-describe", js, "octocoder") == (
        "Question: Provide a concise natural language description of the code using at most 245 characters."
        "\n\nconst truncateNumber = (number) => {\n  return number % 1.0;\n}\n\n\n\nAnswer:")
    # ExplainSynthesize: the description is the context
    assert hep.build_prompt("explain-synthesize", py, "octocoder", description="Return the fractional part.") == (
        "Question: Write functional code in Python according to the description.\nReturn the fractional part."
        "\n\nAnswer:\ndef truncate_number(number: float) -> float:")
    # Rust declarations get fn main(){} in front (FixTests and Explain)
    fix_rs = hep.build_prompt("fix-tests", rs, "octocoder")
    assert fix_rs.startswith("Question: Fix bugs in truncate_number.\nfn main(){}\n\nuse std::{slice::Iter")
    assert fix_rs.endswith("\n\nAnswer:\nfn main(){}\n\nuse std::{slice::Iter, cmp::{max, self}, mem::replace, "
                           "collections::{HashSet, HashMap}, ops::Index, ascii::AsciiExt};\nuse rand::Rng;\n"
                           "use regex::Regex;\nuse md5;\nuse std::any::{Any, TypeId};\n\n"
                           "fn truncate_number(number: &f32) -> f32{")
    # instruct puts the context first; FixDocs carries the docstring prompt and no test
    fix_docs = hep.build_prompt("fix-docs", js, "instruct")
    assert fix_docs.startswith("/* Given a positive floating point number")
    assert "return number % 1.0 + 1.0;\n}\n\n\nFix bugs in truncateNumber.\n\n/* Given" in fix_docs
    assert "testTruncateNumber" not in fix_docs
    with pytest.raises(hep.DataError, match="only for synthesize"):
        hep.build_prompt("fix-tests", py, "continue")
    with pytest.raises(hep.DataError, match="--descriptions"):
        hep.build_prompt("explain-synthesize", py, "octocoder")


def test_stop_words_are_fresh_lists():
    a = hep.stop_words("synthesize", "python")
    assert a == ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\nassert", "<|endoftext|>"]
    a.append("x")
    assert "x" not in hep.stop_words("synthesize", "python")  # the harness's global-list mutation is not copied
    assert hep.stop_words("synthesize", "go") == ["\n//", "\nfunc main(", "struct", "\nfunc", "<|endoftext|>"]
    assert hep.stop_words("fix-tests", "rust") == ["<|endoftext|>"]
    # explain-describe has the language's stop words too (harness: HumanEvalPack.__init__ for every task)
    assert hep.stop_words("explain-describe", "python") == hep.stop_words("synthesize", "python")


def test_harness_postprocess_details(data):
    """Harness rules: Java appends "\n}" only when a generated "{" is left open; explain-synthesize answers are
    glued onto doc["prompt"] (with docstring); explain-describe cuts at the language's stop words."""
    java = data["java"][2]
    p = hep.build_prompt("synthesize", java, "octocoder")
    # closes the method, not the class: kept as is (no class brace appended)
    out = hep.postprocess("synthesize", "java", java, p + "\n        return 1.0;\n    }")
    assert out.endswith("return 1.0;\n    }") and out.count("{") == out.count("}") + 1
    # an if block left open after the last "}": closed once
    out = hep.postprocess("synthesize", "java", java, p + "\n        if (a) {\n        if (b) {\n x;\n        }")
    assert out.endswith("x;\n        }\n}")
    py = data["python"][2]
    p = hep.build_prompt("explain-synthesize", py, "octocoder", description="d")
    out = hep.postprocess("explain-synthesize", "python", py, p + "\n    return number % 1.0\n", description="d")
    assert out == py["prompt"].rstrip() + "\n    return number % 1.0"
    p = hep.build_prompt("fix-tests", py, "octocoder")
    assert hep.postprocess("fix-tests", "python", py, p + "\n    return 1\n") == py["declaration"].rstrip() + "\n    return 1"
    p = hep.build_prompt("explain-describe", py, "octocoder")
    assert hep.postprocess("explain-describe", "python", py, p + " Returns the fraction.\ndef f(): pass") == \
        "Returns the fraction."


def test_postprocess_cuts_at_stop_words_and_block_ends(data):
    py, js, java, go = data["python"][2], data["js"][2], data["java"][2], data["go"][2]
    prompt = hep.build_prompt("synthesize", py, "octocoder")
    gen = prompt + "\n    return number % 1.0\n\nprint(truncate_number(2.5))\ndef other():\n    pass"
    assert hep.postprocess("synthesize", "python", py, gen) == py["prompt"].rstrip() + "\n    return number % 1.0\n"
    # an unindented line ends the function even without a stop word
    assert hep.postprocess("synthesize", "python", py, prompt + "\n    return 1\nx = 2\n").endswith("\n    return 1")
    with pytest.raises(hep.DataError, match="does not start with the prompt"):
        hep.postprocess("synthesize", "python", py, "something else")
    # braces: js closes the function (1 open), java the method and the class (2 open)
    p = hep.build_prompt("fix-tests", js, "octocoder")
    assert hep.postprocess("fix-tests", "js", js, p + "\n  return number % 1.0;\n}\nconsole.log(1)\n}") == \
        "\nconst truncateNumber = (number) => {\n  return number % 1.0;\n}"
    p = hep.build_prompt("synthesize", java, "octocoder")
    out = hep.postprocess("synthesize", "java", java, p + "\n        return number % 1.0;\n    }\n}\nclass X {}")
    assert out.endswith("return number % 1.0;\n    }\n}")
    # java without closing braces: cut before main, close the class
    out = hep.postprocess("synthesize", "java", java, p + "\n        return 1.0;\n    }\n    public static void main(String[] a) {")
    assert out.endswith("return 1.0;\n    }\n    }") or out.endswith("return 1.0;\n    }\n}")
    # go: "\nfunc" is a stop word
    p = hep.build_prompt("synthesize", go, "octocoder")
    out = hep.postprocess("synthesize", "go", go, p + "\n    return math.Mod(number, 1)\n}\n\nfunc main() {}")
    assert out.endswith("func TruncateNumber(number float64) float64 {\n    return math.Mod(number, 1)\n}")
    # explain-describe: at most len(docstring) characters, code lines > 20 characters removed
    p = hep.build_prompt("explain-describe", py, "octocoder")
    text = hep.postprocess("explain-describe", "python", py, p + "\nReturns the fractional part: return number % 1.0"
                           + " more" * 100 + "<|endoftext|>")
    assert text.startswith("Returns the fractional part:") and len(text) <= len(py["docstring"])
    p = hep.build_prompt("explain-describe", data["python"][0], "octocoder")
    code_line = "for idx, elem in enumerate(numbers):"
    text = hep.postprocess("explain-describe", "python", data["python"][0], p + f" Checks pairs. {code_line} done")
    assert code_line not in text and text.startswith("Checks pairs.")


def test_programs_get_each_languages_preamble(data):
    py = data["python"][2]
    prog = hep.build_program("python", "def truncate_number(x):\n    return x % 1.0", py)
    assert prog.startswith("import math\n") and "from typing import *" in prog and prog.endswith("check(truncate_number)")
    go = data["go"][2]
    code = 'import (\n    "math"\n)\n\nfunc TruncateNumber(number float64) float64 {\n    return math.Mod(number,1)\n}'
    prog = hep.build_program("go", code, go)
    assert prog.startswith("package main\n\nimport (\n    \"testing\"") and prog.count("package main") == 1
    assert 'import (\n    "math"\n)' in prog and '"strings"' not in prog
    # a comment mentioning fmt. does not import fmt
    prog = hep.build_program("go", "// fmt.Println\nfunc TruncateNumber(n float64) float64 {\n    return n\n}", go)
    assert '"fmt"' not in prog
    rs = data["rust"][2]
    prog = hep.build_program("rust", "fn truncate_number(number: &f32) -> f32{ return number % 1.0; }", rs)
    assert prog.startswith("fn main(){}\n") and "use regex::Regex;" in prog and prog.count("fn truncate_number") == 1
    prog = hep.build_program("rust", "fn main(){}\nfn a(){}\nfn main(){}\nfn b(){}", rs)
    assert prog.count("fn main()") == 1 and "fn b" not in prog.split("#[cfg(test)]")[0]
    cpp_prog = hep.build_program("cpp", "int f(){return 1;}\nint main(){}", {"test": "int main(){}"})
    assert cpp_prog == "using namespace std;\nint f(){return 1;}\n\nint main(){}"
    java_prog = hep.build_program("java", "class Solution {}\npublic class Main {\n    }", {"test": "T"})
    assert java_prog == "class Solution {}\n\nT"


def test_generation_file_formats(data, tmp_path):
    problems = data["python"][:3]
    ws = [p["prompt"][len(p["prompt"].rstrip()):] for p in problems]
    # JSONL {task_id, completion}: two samples for the first problem
    rows = [{"task_id": p["task_id"], "completion": w + p["canonical_solution"]} for p, w in zip(problems, ws)]
    rows.append({"task_id": problems[0]["task_id"], "completion": "\n    return None\n"})
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gens = hep.load_generations(tmp_path / "g.jsonl", "synthesize", "python", problems)
    assert [len(g) for g in gens] == [2, 1, 1]
    assert gens[1][0] == problems[1]["prompt"].rstrip() + ws[1] + problems[1]["canonical_solution"].rstrip()
    assert gens[0][1] == problems[0]["prompt"].rstrip() + "\n    return None"
    # harness JSON list: raw generations (start with the prompt) are post-processed, others kept as code
    prompt0 = hep.build_prompt("synthesize", problems[0], "octocoder")
    raw = [[prompt0 + ws[0] + problems[0]["canonical_solution"] + "\nprint(1)", "def f(): pass"], ["x"], ["y"]]
    (tmp_path / "g.json").write_text(json.dumps(raw))
    gens = hep.load_generations(tmp_path / "g.json", "synthesize", "python", problems)
    assert gens[0][0] == problems[0]["prompt"].rstrip() + ws[0] + problems[0]["canonical_solution"]  # cut at "\\nprint"
    assert gens[0][1] == "def f(): pass" and gens[1] == ["x"]
    with pytest.raises(hep.DataError, match="use --limit 1"):
        hep.load_generations(_write(tmp_path / "short.json", [["a"]]), "synthesize", "python", problems)
    with pytest.raises(hep.DataError, match="no completion for task_id 'Python/2'"):
        hep.load_generations(_write_jsonl(tmp_path / "m.jsonl", rows[:2]), "synthesize", "python", problems)
    # descriptions for explain-synthesize: each description is its own prompt
    (tmp_path / "d.json").write_text(json.dumps([["desc a", "desc b"], ["c"], ["d"]]))
    descs = hep.load_descriptions(tmp_path / "d.json", problems)
    assert descs[0] == ["desc a", "desc b"]
    p1 = hep.build_prompt("explain-synthesize", problems[0], "octocoder", description="desc b")
    gens = hep.load_generations(_write(tmp_path / "e.json", [["a", p1 + "\n    return 1\n"], ["b"], ["c"]]),
                                "explain-synthesize", "python", problems, descriptions=descs)
    assert gens[0][1] == problems[0]["prompt"].rstrip() + "\n    return 1"
    # the harness's explain-synthesize generations.json: one list per (problem, description), problem-major
    p0 = hep.build_prompt("explain-synthesize", problems[0], "octocoder", description="desc a")
    flat = [[p0 + "\n    return 0\n"], [p1 + "\n    return 1\n"], ["b"], ["c"]]
    gens = hep.load_generations(_write(tmp_path / "h.json", flat), "explain-synthesize", "python", problems,
                                descriptions=descs)
    assert [len(g) for g in gens] == [2, 1, 1] and gens[1:] == [["b"], ["c"]]
    assert gens[0] == [problems[0]["prompt"].rstrip() + "\n    return 0", problems[0]["prompt"].rstrip() + "\n    return 1"]
    with pytest.raises(hep.DataError, match="or 4 .the harness's one per problem and description"):
        hep.load_generations(_write(tmp_path / "h2.json", flat[:2]), "explain-synthesize", "python", problems,
                             descriptions=descs)


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
