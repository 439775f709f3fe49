"""HumanEvalPack (OctoPack): tasks, prompts, stop words, post-processing, programs and scoring.

Follows bigcode-evaluation-harness ``bigcode_eval/tasks/humanevalpack.py`` and the ``code_eval_octopack`` metric
(facts in ../shared/reference/megatron-octopack.md §3):

- tasks: ``fix-tests`` (HumanEvalFixTests), ``fix-docs`` (HumanEvalFixDocs), ``explain-describe``,
  ``explain-synthesize`` (reads the descriptions explain-describe produced) and ``synthesize``; languages
  ``python, js, java, cpp, go, rust``;
- :func:`build_prompt` — templates ``octocoder`` (``Question: {inp}\\n\\nAnswer:\\n{prompt_base}``), ``octogeex``,
  ``instruct`` and ``continue`` (the bare prompt, Synthesize only); the whole prompt is ``.strip()``-ped;
- :func:`stop_words`, :func:`remove_last_block`, :func:`postprocess` — string-level: the generation is the full
  decoded text starting with the prompt;
- :func:`build_program` — candidate + ``"\\n"`` + test, with each language's preamble (Python imports, Rust
  ``fn main(){}`` + declarations, Java ``Main`` clean-up, C++ ``int main`` cut; the C++ ``#include`` preamble is a
  precompiled header added by :mod:`megaocto.eval.execute`); Go exactly as the harness builds it (test_setup, an
  import block of the packages the whole program uses, the candidate as written, test);
- :func:`evaluate` — runs every sample in the sandbox and returns per-problem results plus pass@k.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from megaocto.data.jsonl import BadRowError, iter_jsonl
from megaocto.eval.passk import DEFAULT_KS, pass_at_k, pass_at_k_summary

__all__ = ["TASKS", "TEMPLATES", "LANGUAGES", "SAMPLE_DIR", "load_problems", "build_prompt", "prompt_base", "stop_words",
           "remove_last_block", "postprocess", "build_program", "load_generations", "load_descriptions",
           "evaluate", "EvalResults", "pass_at_k", "DataError"]

TASKS = ("fix-tests", "fix-docs", "explain-describe", "explain-synthesize", "synthesize")
TEMPLATES = ("octocoder", "octogeex", "instruct", "continue")
LANGUAGES = ("python", "js", "java", "cpp", "go", "rust")
LANGUAGE_NAMES = {"python": "Python", "js": "JavaScript", "java": "Java", "cpp": "C++", "go": "Go", "rust": "Rust"}
HARNESS_TASK = {"fix-tests": "humanevalfixtests", "fix-docs": "humanevalfixdocs",
                "explain-describe": "humanevalexplaindescribe", "explain-synthesize": "humanevalexplainsynthesize",
                "synthesize": "humanevalsynthesize"}
EOS = "<|endoftext|>"
LANGUAGE_STOP_WORDS = {
    "python": ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\nassert"],
    "go": ["\n//", "\nfunc main(", "struct", "\nfunc"],
    "cpp": [], "js": [], "java": [], "rust": [],
}
REQUIRED_FIELDS = ("task_id", "prompt", "declaration", "canonical_solution", "buggy_solution", "test", "docstring",
                   "entry_point", "instruction")
PYTHON_PREAMBLE = ("import math\nimport re\nimport sys\nimport copy\nimport datetime\nimport itertools\n"
                   "import collections\nimport heapq\nimport statistics\nimport functools\nimport hashlib\n"
                   "try:\n    import numpy\n    import numpy as np\nexcept ImportError:\n    pass\n"
                   "import string\nfrom typing import *\nfrom collections import *\n")
PYTHON_PREAMBLE_NO_NUMPY = PYTHON_PREAMBLE.replace("try:\n    import numpy\n    import numpy as np\nexcept ImportError:\n"
                                                   "    pass\n", "")
# the harness's IMPORT_HELPER["go"], in its order: packages the Go program construction may import
GO_PACKAGES = ("math", "strings", "fmt", "strconv", "time", "bytes", "regexp", "sort", "math/rand", "crypto/md5")


# 3 Python problems of HumanEvalPack shipped with the package (MIT; source and license in its README.md): offline
# smoke runs (`megaocto eval humanevalpack --sample`, `make demo`), not a benchmark
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "resources" / "humanevalpack-sample"


class DataError(ValueError):
    """Problems, generations or descriptions are malformed; the message names the file and the entry."""


# --------------------------------------------------------------------------------------------------- problems
def load_problems(lang: str, path: str | os.PathLike | None = None) -> list[dict]:
    """The 164 problems of `lang` in task order.

    `path`: a directory holding ``<lang>.jsonl`` (e.g. ../shared/data/humanevalpack) or a ``.jsonl`` file; None
    reads ``$MEGAOCTO_HUMANEVALPACK`` when set, else the hub dataset ``bigcode/humanevalpack`` (config `lang`,
    split ``test``) through the ``datasets`` package (needs it installed and the hub reachable)."""
    if lang not in LANGUAGES:
        raise DataError(f"unknown language {lang!r}; expected one of {', '.join(LANGUAGES)}")
    path = path if path is not None else os.environ.get("MEGAOCTO_HUMANEVALPACK")
    if path is None:
        return _load_hub(lang)
    p = Path(path)
    file = p / f"{lang}.jsonl" if p.is_dir() else p
    if not file.exists() and p.resolve() == SAMPLE_DIR:
        raise DataError(f"the packaged HumanEvalPack sample ({SAMPLE_DIR}) holds python only; pass --data-dir DIR "
                        f"with {lang}.jsonl for --lang {lang}")
    if not file.exists():
        raise DataError(f"{file}: no such file; --data-dir must hold <lang>.jsonl files (python.jsonl, js.jsonl, ...)")
    try:  # the project's JSON Lines reader: "file:line: reason" for a bad row, nothing skipped silently
        problems = list(iter_jsonl(str(file), required_keys=REQUIRED_FIELDS))
    except BadRowError as e:
        if e.category == "missing key":
            raise DataError(f"{e.path}:{e.line}: missing HumanEvalPack fields ({e.detail} and maybe others; "
                            f"a row needs {', '.join(REQUIRED_FIELDS)})") from None
        raise DataError(str(e)) from None
    if not problems:
        raise DataError(f"{file}: no problems")
    return problems


def _load_hub(lang: str) -> list[dict]:
    try:
        import datasets  # type: ignore
    except ImportError:
        raise DataError("no --data-dir given and the `datasets` package is not installed; pass --data-dir DIR with "
                        "<lang>.jsonl files or `pip install datasets` to read bigcode/humanevalpack") from None
    try:
        ds = datasets.load_dataset("bigcode/humanevalpack", lang, split="test")
    except Exception as e:  # network/hub errors have many types
        raise DataError(f"could not load bigcode/humanevalpack ({lang}) from the hub: {e}; pass --data-dir") from None
    return [dict(row) for row in ds]


def _lang_of(problem: dict) -> str:
    prefix = str(problem.get("task_id", "")).split("/")[0].lower()
    lang = {"python": "python", "javascript": "js", "js": "js", "java": "java", "cpp": "cpp", "c++": "cpp",
            "go": "go", "rust": "rust"}.get(prefix)
    if lang is None:
        raise DataError(f"cannot tell the language of task_id {problem.get('task_id')!r}; pass lang=")
    return lang


def _check(task: str, template: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if template == "continue" and task != "synthesize":
        raise DataError(f"template 'continue' is only for synthesize (base models); use 'instruct' or 'octocoder' "
                        f"for {task}")


# ---------------------------------------------------------------------------------------------------- prompts
def prompt_base(task: str, problem: dict, lang: str | None = None) -> str:
    """The code the answer continues: the docstring prompt (synthesize, fix-docs) or the bare declaration (fix-tests,
    explain-*), with ``fn main(){}`` before Rust declarations."""
    lang = lang or _lang_of(problem)
    if task in ("synthesize", "fix-docs"):
        return problem["prompt"]
    if lang == "rust":
        return "fn main(){}\n" + problem["declaration"]
    return problem["declaration"]


def _instruction_context(task: str, problem: dict, lang: str, description: str | None) -> tuple[str, str | None]:
    base = prompt_base(task, problem, lang)
    if task == "fix-tests":
        return f"Fix bugs in {problem['entry_point']}.", base + problem["buggy_solution"] + "\n" + problem["test"]
    if task == "fix-docs":
        return f"Fix bugs in {problem['entry_point']}.", base + problem["buggy_solution"]
    if task == "explain-describe":
        return (f"Provide a concise natural language description of the code using at most "
                f"{len(problem['docstring'])} characters.", base + problem["canonical_solution"])
    if task == "explain-synthesize":
        if description is None:
            raise DataError("explain-synthesize needs the description produced by explain-describe "
                            "(--descriptions FILE)")
        return f"Write functional code in {LANGUAGE_NAMES[lang]} according to the description.", description
    return problem["instruction"].strip(), None


def build_prompt(task: str, problem: dict, template: str = "octocoder", *, lang: str | None = None,
                 description: str | None = None) -> str:
    """The prompt text exactly as the harness builds it (then ``.strip()``-ped)."""
    _check(task, template)
    lang = lang or _lang_of(problem)
    instruction, context = _instruction_context(task, problem, lang, description)
    base = "" if task == "explain-describe" else prompt_base(task, problem, lang)
    if context is None:
        inp = instruction
    elif template in ("continue", "instruct"):
        inp = context + "\n" + instruction
    else:
        inp = instruction + "\n" + context
    if template == "continue":
        prompt = base
    elif template == "instruct":
        prompt = inp + "\n\n" + base
    elif template == "octocoder":
        prompt = f"Question: {inp}\n\nAnswer:\n{base}"
    else:  # octogeex
        prompt = f"Question: {inp.strip()}\n\nAnswer:\n{base}"
    return prompt.strip()


def stop_words(task: str, lang: str) -> list[str]:
    """Stop strings for generation and post-processing (a fresh list each call: no harness-style global mutation).

    Every task, explain-describe included, uses the language's stop words plus ``<|endoftext|>`` (the harness's
    ``HumanEvalPack.__init__`` sets them for all five task classes)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return [*LANGUAGE_STOP_WORDS[lang], EOS]


# ------------------------------------------------------------------------------------------- post-processing
def _open_braces(lang: str) -> int:
    return 2 if lang == "java" else 1


def remove_last_block(code: str, lang: str, stops: Sequence[str] | None = None) -> str:
    """Cut a continuation at the first stop word, then where the function ends (harness ``remove_last_block``)."""
    for w in (stops if stops is not None else [*LANGUAGE_STOP_WORDS[lang], EOS]):
        if w in code:
            code = code[:code.find(w)]
    if lang == "python":
        lines = code.split("\n")
        for i, line in enumerate(lines):
            if line.strip() and line[0] not in (" ", "\t"):
                return "\n".join(lines[:i])
        return code
    depth = _open_braces(lang)
    for i, ch in enumerate(code):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return code[:i + 1]
    if lang == "java":
        main = code.find("public static void main")
        if main != -1:
            code = code[:main] + "}"
        if "}" in code:
            code = code[:code.rfind("}")] + "}"
        if code.count("{") - 1 == code.count("}"):  # the class is still open: close it
            code += "\n}"
        return code
    if "}" in code:
        code = code[:code.rfind("}")] + "}"
    return code


def postprocess(task: str, lang: str, problem: dict, generation: str, *, template: str = "octocoder",
                description: str | None = None) -> str:
    """The candidate code (or, for explain-describe, the description) from one full generation (prompt + new text).

    The generation must start with the prompt (string-level removal, as in the harness)."""
    prompt = build_prompt(task, problem, template, lang=lang, description=description)
    if not generation.startswith(prompt):
        raise DataError(f"{problem['task_id']}: the generation does not start with the prompt; pass only the new "
                        f"text as a completion instead")
    new = generation[len(prompt):]
    if task == "explain-describe":
        # harness: remove_last_block(new.strip()[:len(docstring)]).rstrip(), then remove_code (no final strip)
        text = new.strip()[:len(problem["docstring"])]
        for w in stop_words(task, lang):
            if w in text:
                text = text[:text.find(w)]
        text = text.rstrip()
        for line in problem["canonical_solution"].split("\n"):
            if len(line.strip()) > 20 and line.strip() in text:
                text = text.replace(line.strip(), "")
        return text
    gen = remove_last_block(new.rstrip(), lang, stop_words(task, lang))
    # fix-*: prompt_base.rstrip() + gen (HumanEvalFixBase); synthesize and explain-synthesize: doc["prompt"].rstrip()
    # + gen (HumanEvalPackGenerative: for explain-synthesize the docstring prompt, although it generated after the
    # bare declaration)
    head = prompt_base(task, problem, lang) if task.startswith("fix-") else problem["prompt"]
    return head.rstrip() + gen


# -------------------------------------------------------------------------------------------------- programs
def _go_program(code: str, problem: dict) -> str:
    """The harness's Go program (``HumanEvalPack.process_results`` for "go", then the metric's candidate + "\\n" +
    reference, the reference being "\\n" + test), built per sample:

    1. ``test_setup + "\\n"`` minus each of its quoted import lines that occurs anywhere in the candidate;
    2. an ``import (...)`` block of every package of :data:`GO_PACKAGES` whose quoted path is nowhere in
       setup + candidate + "\\n" + reference and whose ``<last path element>.`` occurs in one of its lines not
       starting with ``//`` (substring tests, as in the harness; math/rand and crypto/md5 are imported as "rand"
       and "md5", which the harness does too and which do not compile);
    3. the candidate as written — its own import block stays, so an unused import fails to compile there and
       here — without ``package main`` when test_setup has it;
    4. "\\n" + reference.
    The harness removes test_setup lines cumulatively over a problem's samples; here each sample starts afresh."""
    if "test_setup" not in problem:
        raise DataError(f"{problem.get('task_id')}: a Go problem needs its `test_setup` field")
    setup = problem["test_setup"] + "\n"
    for line in setup.split("\n"):
        quoted = line.replace("import", "").replace("(", "").replace(")", "").strip()
        if quoted.startswith('"') and quoted in code:
            setup = setup.replace(quoted, "")
    reference = "\n" + problem["test"]
    whole = setup + code + "\n" + reference
    lines = whole.split("\n")
    imports = []
    for pkg in GO_PACKAGES:
        name = pkg.split("/")[-1]
        if f'"{pkg}"' not in whole and any(name + "." in ln and not ln.strip().startswith("//") for ln in lines):
            imports.append(f'"{name}"')
    block = "import (\n" + "\n".join(f"    {p}" for p in imports) + "\n)\n" if imports else ""
    if "package main" in code and "package main" in setup:
        code = code.replace("package main", "")
    return setup + block + code + "\n" + reference


def _rust_program(code: str, problem: dict) -> str:
    if "fn main()" not in code:
        code = "fn main(){}\n" + code
    first = code.find("fn main()")
    second = code.find("fn main()", first + 1)
    if second != -1:
        code = code[:second]
    extra = []
    for line in problem["declaration"].split("\n"):
        s = line.strip()
        if not s or s in code:
            continue
        m = re.match(r"fn\s+(\w+)", s)
        if m and m.group(1) in code:
            continue
        if m:  # the function signature line itself: the candidate defines it
            continue
        extra.append(line)
    if extra:
        head, sep, rest = code.partition("fn main(){}\n")
        code = head + sep + "\n".join(extra) + "\n" + rest if sep else "\n".join(extra) + "\n" + code
    return code + "\n" + problem["test"]


def build_program(lang: str, code: str, problem: dict) -> str:
    """The program the sandbox runs: candidate `code` (a post-processed sample) + "\\n" + the problem's test."""
    if lang == "python":
        program = code + "\n" + problem["test"]
        # numpy is the one slow import of the harness preamble: only programs that name it get it
        preamble = PYTHON_PREAMBLE if re.search(r"\b(np|numpy)\b", program) else PYTHON_PREAMBLE_NO_NUMPY
        return preamble + program
    if lang == "js":
        return code + "\n" + problem["test"]
    if lang == "java":
        return code.replace("public class Main {\n    }", "") + "\n" + problem["test"]
    if lang == "cpp":
        cut = code.find("int main")
        if cut != -1:
            code = code[:cut]
        return "using namespace std;\n" + code + "\n" + problem["test"]
    if lang == "go":
        return _go_program(code, problem)
    if lang == "rust":
        return _rust_program(code, problem)
    raise DataError(f"unknown language {lang!r}")


# ------------------------------------------------------------------------------------------------ generations
def _read_json_or_jsonl(path: Path) -> tuple[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return "json", json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not JSON ({e})") from None
    return "jsonl", rows


def load_generations(path: str | os.PathLike, task: str, lang: str, problems: Sequence[dict], *,
                     template: str = "octocoder", descriptions: Sequence[Sequence[str]] | None = None,
                     field_name: str = "completion") -> list[list[str]]:
    """Post-processed samples per problem, in `problems` order, from a generations file.

    Formats:
    - the harness's JSON list (one list of strings per problem, in task order; problems beyond the list's length
      are dropped, so ``--limit`` works). A string that starts with the prompt is a raw generation and is
      post-processed; any other string is taken as already post-processed (the harness saves
      post-processed code in ``generations.json``);
    - JSONL ``{"task_id": ..., "completion": ...}`` rows (several rows per task_id = several samples): the
      completion is the text generated after the prompt and is post-processed (``prompt + completion``).
    For explain-synthesize the prompts depend on `descriptions`: a problem's samples are description-major (n per
    description, as megaocto writes them); the harness's own layout, one list per (problem, description) in
    problem-major order, is recognised by its length and regrouped per problem."""
    path = Path(path)
    kind, data = _read_json_or_jsonl(path)

    def desc_for(i: int, j: int, n: int) -> str | None:
        """Description of sample j of n for problem i: samples are description-major (n / len(descs) each, as
        generate_samples writes them), else round-robin."""
        if descriptions is None:
            return None
        d = descriptions[i]
        return d[j * len(d) // n] if n % len(d) == 0 else d[j % len(d)]

    def prompt_for(i: int, j: int, n: int) -> str:
        return build_prompt(task, problems[i], template, lang=lang, description=desc_for(i, j, n))

    out: list[list[str]] = []
    if kind == "json":
        if not all(isinstance(g, list) and all(isinstance(s, str) for s in g) for g in data):
            raise DataError(f"{path}: expected a JSON list of lists of strings (one list per problem)")
        if (descriptions is not None and len(data) != len(problems)
                and any(len(d) > 1 for d in descriptions[:len(problems)])):
            # the harness's explain-synthesize layout: one list per (problem, description), problem-major
            total = sum(len(d) for d in descriptions[:len(problems)])
            if len(data) < total:
                raise DataError(f"{path}: {len(data)} lists of generations; expected {len(problems)} (one per problem) "
                                f"or {total} (the harness's one per problem and description)")
            regrouped, pos = [], 0
            for i in range(len(problems)):
                group: list[str] = []
                for _ in descriptions[i]:
                    group.extend(data[pos])
                    pos += 1
                regrouped.append(group)
            data = regrouped
        if len(data) < len(problems):
            raise DataError(f"{path}: {len(data)} problems of generations but {len(problems)} problems to score; "
                            f"use --limit {len(data)}")
        for i, gens in enumerate(data[:len(problems)]):
            samples = []
            for j, g in enumerate(gens):
                if g.startswith(prompt_for(i, j, len(gens))):
                    samples.append(postprocess(task, lang, problems[i], g, template=template,
                                               description=desc_for(i, j, len(gens))))
                else:
                    samples.append(g)
            out.append(samples)
        return out
    by_id: dict[str, list[str]] = {}
    for n, row in enumerate(data, 1):
        if not isinstance(row, dict) or "task_id" not in row or field_name not in row:
            raise DataError(f"{path}:{n}: expected {{\"task_id\": ..., \"{field_name}\": ...}}")
        by_id.setdefault(str(row["task_id"]), []).append(str(row[field_name]))
    for i, problem in enumerate(problems):
        comps = by_id.get(str(problem["task_id"]))
        if not comps:
            raise DataError(f"{path}: no {field_name} for task_id {problem['task_id']!r}")
        out.append([postprocess(task, lang, problem, prompt_for(i, j, len(comps)) + c, template=template,
                                description=desc_for(i, j, len(comps))) for j, c in enumerate(comps)])
    return out


def load_descriptions(path: str | os.PathLike, problems: Sequence[dict]) -> list[list[str]]:
    """Descriptions for explain-synthesize: the harness's JSON list of lists (explain-describe's
    ``generations.json``, or megaocto's ``generations.json`` from ``--task explain-describe``) or JSONL
    ``{task_id, description}`` rows (``completion`` also accepted)."""
    path = Path(path)
    kind, data = _read_json_or_jsonl(path)
    if kind == "json":
        if not all(isinstance(g, list) and g and all(isinstance(s, str) for s in g) for g in data):
            raise DataError(f"{path}: expected a JSON list with one non-empty list of descriptions per problem")
        if len(data) < len(problems):
            raise DataError(f"{path}: descriptions for {len(data)} problems, {len(problems)} needed")
        return [list(g) for g in data[:len(problems)]]
    by_id: dict[str, list[str]] = {}
    for n, row in enumerate(data, 1):
        text = row.get("description", row.get("completion")) if isinstance(row, dict) else None
        if text is None or "task_id" not in row:
            raise DataError(f"{path}:{n}: expected {{\"task_id\": ..., \"description\": ...}}")
        by_id.setdefault(str(row["task_id"]), []).append(str(text))
    missing = [p["task_id"] for p in problems if str(p["task_id"]) not in by_id]
    if missing:
        raise DataError(f"{path}: no description for {missing[:5]}")
    return [by_id[str(p["task_id"])] for p in problems]


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class EvalResults:
    """Scores of one task × language: pass@k (mean over problems) and one record per problem."""

    task: str
    lang: str
    metrics: dict[str, float]
    problems: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        n = [p["n"] for p in self.problems]
        return {"task": self.task, "lang": self.lang, **self.metrics, "problems": len(self.problems),
                "samples": sum(n), "passed_samples": sum(p["correct"] for p in self.problems)}


def evaluate(task: str, lang: str, generations: Sequence[Sequence[str]], *, problems: Sequence[dict] | None = None,
             workers: int = 2, timeout: float | None = None, ks: Sequence[int] = DEFAULT_KS,
             cache_dir: str | os.PathLike | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalResults:
    """Execute every post-processed sample against its problem's tests; pass@k for k <= n.

    `generations[i]` are the samples of `problems[i]` (default: the first len(generations) problems of
    ``load_problems(lang)``). explain-describe has nothing to execute (its output feeds explain-synthesize)."""
    from megaocto.eval.execute import run_programs

    if task == "explain-describe":
        raise DataError("explain-describe produces descriptions and is not executed; run explain-synthesize with "
                        "--descriptions on its output")
    if problems is None:
        problems = load_problems(lang)[:len(generations)]
    if len(generations) != len(problems):
        raise DataError(f"{len(generations)} lists of generations for {len(problems)} problems")
    flat, owner = [], []
    for i, (problem, samples) in enumerate(zip(problems, generations)):
        if not samples:
            raise DataError(f"{problem['task_id']}: no samples")
        for code in samples:
            flat.append(build_program(lang, code, problem))
            owner.append(i)
    results = run_programs(lang, flat, workers=workers, timeout=timeout,
                           cache_dir=Path(cache_dir) if cache_dir is not None else None, progress=progress)
    per: list[list] = [[] for _ in problems]
    for i, r in zip(owner, results):
        per[i].append(r)
    records, counts = [], []
    for problem, samples, rs in zip(problems, generations, per):
        c = sum(r.passed for r in rs)
        counts.append((len(rs), c))
        records.append({"task_id": problem["task_id"], "n": len(rs), "correct": c,
                        "samples": [{"code": code, **r.to_dict()} for code, r in zip(samples, rs)]})
    return EvalResults(task, lang, pass_at_k_summary(counts, ks), records)


def canonical_generations(task: str, lang: str, problems: Sequence[dict], *, buggy: bool = False,
                          template: str = "octocoder", post: bool = True) -> list[list[str]]:
    """One sample per problem built from the reference (or buggy) solution through the same prompt →
    post-processing path a model's output takes: the generation is the prompt, the whitespace the final
    ``.strip()`` removed, then the solution (validity tests and ``bench/eval_bench.py``). ``post=False`` skips the
    post-processing (answer start + solution as is: what the harness's own validity check runs)."""
    out = []
    for p in problems:
        prompt = build_prompt(task, p, template, lang=lang, description="(canonical)")
        base = prompt_base(task, p, lang)
        ws = base[len(base.rstrip()):]
        body = p["buggy_solution"] if buggy else p["canonical_solution"]
        if post:
            out.append([postprocess(task, lang, p, prompt + ws + body, template=template, description="(canonical)")])
        else:
            out.append([base.rstrip() + ws + body])
    return out
