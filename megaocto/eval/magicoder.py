"""Magicoder's evaluation prompt (ise-uiuc/magicoder ``experiments/text2code.py``; ../shared/reference/
magicoder-inversecoder.md §1.9) on HumanEval through HumanEvalPack's Python problems, or on an EvalPlus problem
file (HumanEval+ / MBPP+ jsonl as EvalPlus ships it) with EvalPlus-style differential testing.

- HumanEval(+): instruction ``Write a solution to the following problem:\\n```python\\n{prompt.strip()}\\n```"``,
  the response pre-filled with ``"```python\\n{prompt.strip()}"``, both in the training template
  (:func:`megaocto.data.formats.magicoder_prompt`); the completion is cut at its first ```` ``` ````; the program
  scored is ``prompt + completion`` (as EvalPlus scores it).
- MBPP(+): instruction = the docstring text before its ``assert`` (a ``.`` appended if missing) + `` Your code
  should satisfy the following assertion:\\n```python\\n{assertion}\\n```"``, the response pre-filled with
  ````python``; the program is the completion cut at the fence (EvalPlus's ``sanitize`` is not applied).
- Greedy decoding (Magicoder: temperature 0, one sample), ``max_new_tokens`` 512.
- EvalPlus files (rows with ``base_input`` / ``plus_input``): the expected outputs come from running the
  problem's ``canonical_solution`` on the same inputs in the same sandboxed program; outputs compare exactly,
  floats (or flat lists/tuples of floats) with ``rel 1e-7`` and ``atol`` (1e-6 when the problem's atol is 0), and
  HumanEval/32 (``find_zero``) by ``|poly(xs, x)| <= 1e-6``; a sample passes "plus" only if it passes the base
  and the plus inputs. EvalPlus's other special oracles are not reproduced: for leaderboard numbers run
  ``evalplus.evaluate`` on the ``samples.jsonl`` written here (``{task_id, solution}`` rows).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megaocto.data.formats import magicoder_prompt
from megaocto.eval import humanevalpack as hep
from megaocto.eval.passk import pass_at_k_summary

FENCE = "```"
HUMANEVAL_INSTRUCTION = "Write a solution to the following problem:\n```python\n{prompt}\n```"
MBPP_ASSERTION = " Your code should satisfy the following assertion:\n```python\n{assertion}\n```"
EVALPLUS_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input")


@dataclass(frozen=True)
class Problem:
    """One problem as this module needs it; ``raw`` is the row as read (HumanEvalPack or EvalPlus)."""

    task_id: str
    dataset: str          # humaneval | mbpp
    instruction: str
    response_prefix: str
    raw: dict

    @property
    def prompt(self) -> str:
        """The model's input: the Magicoder template with the pre-filled response."""
        return magicoder_prompt(self.instruction, self.response_prefix)


def humaneval_problem(row: dict) -> Problem:
    prompt = row["prompt"].strip()
    return Problem(str(row["task_id"]), "humaneval", HUMANEVAL_INSTRUCTION.format(prompt=prompt),
                   f"{FENCE}python\n{prompt}", row)


def mbpp_problem(row: dict) -> Problem:
    text = row["prompt"]
    start, end = text.find('"""'), text.rfind('"""')
    if start == -1 or end <= start:
        raise hep.DataError(f"{row['task_id']}: an MBPP+ prompt holds its description in a docstring (\"\"\"...\"\"\")")
    body = text[start + 3:end]
    at = body.find("assert")
    if at == -1:
        raise hep.DataError(f"{row['task_id']}: the MBPP+ docstring has no assertion")
    instruction = body[:at].strip()
    if not instruction.endswith("."):
        instruction += "."
    instruction += MBPP_ASSERTION.format(assertion=body[at:].strip())
    return Problem(str(row["task_id"]), "mbpp", instruction, f"{FENCE}python", row)


def cut_at_fence(completion: str) -> str:
    """The completion up to its first closing fence (all of it when there is none)."""
    i = completion.find(FENCE)
    return completion if i == -1 else completion[:i]


def solution(problem: Problem, completion: str) -> str:
    """The program text scored for a (fence-cut) completion: prompt + completion (HumanEval), the completion (MBPP)."""
    completion = cut_at_fence(completion)
    return problem.raw["prompt"] + completion if problem.dataset == "humaneval" else completion


# ------------------------------------------------------------------------------------------------ problems
def is_evalplus(row: dict) -> bool:
    return "base_input" in row and "plus_input" in row


def load_problems(data: str | None = None, *, sample: bool = False) -> tuple[list[Problem], str]:
    """(problems, source kind): ``data`` = an EvalPlus jsonl (HumanEval+ or MBPP+; kind ``evalplus``), a
    HumanEvalPack ``python.jsonl`` or a directory holding one (kind ``humanevalpack``); None = HumanEvalPack's
    Python problems from ``$MEGAOCTO_HUMANEVALPACK`` or the hub (see :func:`megaocto.eval.humanevalpack.load_problems`)."""
    if sample:
        data = str(hep.SAMPLE_DIR)
    if data is not None and Path(data).is_file():
        from megaocto.data.jsonl import BadRowError, iter_jsonl

        try:
            rows = list(iter_jsonl(data, required_keys=("task_id", "prompt")))
        except BadRowError as e:
            raise hep.DataError(str(e)) from None
        if not rows:
            raise hep.DataError(f"{data}: no problems")
        if is_evalplus(rows[0]):
            for n, row in enumerate(rows, 1):
                missing = [k for k in EVALPLUS_FIELDS if k not in row]
                if missing:
                    raise hep.DataError(f"{data}:{n}: missing EvalPlus fields {missing}")
            return [mbpp_problem(r) if str(r["task_id"]).lower().startswith("mbpp") else humaneval_problem(r)
                    for r in rows], "evalplus"
    rows = hep.load_problems("python", data)
    return [humaneval_problem(r) for r in rows], "humanevalpack"


# ------------------------------------------------------------------------------------------------ EvalPlus tests
_DIFF_TEST = '''\
import json, math, sys
_INPUTS = json.loads({inputs!r})
_ATOL = {atol!r}
_ENTRY = {entry!r}
_TASK = {task!r}
_ref, _cand = {{}}, {{}}
exec(compile({reference!r}, "canonical_solution.py", "exec"), _ref)
exec(compile({candidate!r}, "solution.py", "exec"), _cand)


def _floats(x):
    return isinstance(x, float) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, float) for v in x))


def _same(out, exp, args):
    if _TASK == "HumanEval/32":  # find_zero: any root of the polynomial
        xs = args[0]
        return abs(sum(c * math.pow(out, i) for i, c in enumerate(xs))) <= 1e-6
    if _floats(exp):
        atol = _ATOL or 1e-6
        a = list(out) if isinstance(out, (list, tuple)) else [out]
        b = list(exp) if isinstance(exp, (list, tuple)) else [exp]
        return len(a) == len(b) and all(isinstance(x, (int, float)) and math.isclose(x, y, rel_tol=1e-7, abs_tol=atol)
                                        or x == y for x, y in zip(a, b))
    return out == exp


import copy
for _k, _args in enumerate(_INPUTS):
    _exp = _ref[_ENTRY](*copy.deepcopy(_args))
    _out = _cand[_ENTRY](*copy.deepcopy(_args))
    if not _same(_out, _exp, _args):
        print(f"input {{_k}}: got {{_out!r:.200}}, expected {{_exp!r:.200}}", file=sys.stderr)
        sys.exit(1)
'''


def diff_test_program(problem: Problem, code: str, inputs: list) -> str:
    """A Python program that exits 0 when ``code``'s entry point matches the canonical solution on ``inputs``."""
    raw = problem.raw
    reference = raw["prompt"] + raw["canonical_solution"] if problem.dataset == "humaneval" else raw["canonical_solution"]
    return _DIFF_TEST.format(inputs=json.dumps(inputs), atol=float(raw.get("atol") or 0.0), entry=raw["entry_point"],
                             task=problem.task_id, reference=reference, candidate=code)


# ------------------------------------------------------------------------------------------------ scoring
def evaluate(problems: Sequence[Problem], samples: Sequence[Sequence[str]], kind: str, *, workers: int = 2,
             timeout: float | None = None, ks: Sequence[int] = (1,), progress=None) -> dict:
    """Score per-problem programs (``solution(...)`` texts). humanevalpack: the problem's tests (pass@k);
    evalplus: ``base`` (base inputs) and ``plus`` (base and plus inputs) pass@k. Returns {"summary", "problems"}."""
    from megaocto.eval.execute import run_programs

    if len(samples) != len(problems):
        raise hep.DataError(f"{len(samples)} lists of samples for {len(problems)} problems")
    if kind == "humanevalpack":
        res = hep.evaluate("synthesize", "python", samples, problems=[p.raw for p in problems], workers=workers,
                           timeout=timeout, ks=ks, progress=progress)
        return {"summary": {"protocol": "magicoder", "data": kind, **res.summary()}, "problems": res.problems}
    programs, owner = [], []
    for i, (p, codes) in enumerate(zip(problems, samples)):
        for j, code in enumerate(codes):
            for part in ("base_input", "plus_input"):
                programs.append(diff_test_program(p, code, p.raw[part]))
                owner.append((i, j, part))
    results = run_programs("python", programs, workers=workers, timeout=timeout, progress=progress)
    passed: dict[tuple[int, int, str], bool] = {o: r.passed for o, r in zip(owner, results)}
    status = {o: r.to_dict() for o, r in zip(owner, results)}
    records, base_counts, plus_counts = [], [], []
    for i, (p, codes) in enumerate(zip(problems, samples)):
        base = [passed[(i, j, "base_input")] for j in range(len(codes))]
        plus = [b and passed[(i, j, "plus_input")] for j, b in enumerate(base)]
        base_counts.append((len(codes), sum(base)))
        plus_counts.append((len(codes), sum(plus)))
        records.append({"task_id": p.task_id, "n": len(codes), "base_correct": sum(base), "plus_correct": sum(plus),
                        "samples": [{"solution": c, "base": status[(i, j, "base_input")],
                                     "plus": status[(i, j, "plus_input")]} for j, c in enumerate(codes)]})
    summary = {"protocol": "magicoder", "data": kind, "problems": len(problems),
               **{f"base_{k}": v for k, v in pass_at_k_summary(base_counts, ks).items()},
               **{f"plus_{k}": v for k, v in pass_at_k_summary(plus_counts, ks).items()}}
    return {"summary": summary, "problems": records}


# ------------------------------------------------------------------------------------------------ generation
def generate_completions(model, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int = 512,
                         batch_size: int = 16, n_samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                         seed: int = 0, pc=None) -> list[list[str]]:
    """Completions (text after the pre-filled response, cut at the first fence) per problem; greedy by default.
    Collective over TP like :func:`megaocto.generation.generate_text` (BOS first for Llama-family tokenizers)."""
    from megaocto.generation import GenerationConfig, generate_text

    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p if temperature > 0 else 1.0, seed=seed, eos_id=tokenizer.eod,
                           num_samples=n_samples, stop=(FENCE,))
    texts = generate_text(model, tokenizer, [p.prompt for p in problems], gen, pc, batch_size=batch_size)
    return [[cut_at_fence(t) for t in texts[i * n_samples:(i + 1) * n_samples]] for i in range(len(problems))]


def load_completions(path: str | os.PathLike, problems: Sequence[Problem]) -> list[list[str]]:
    """Completions from JSONL ``{task_id, completion}`` rows (Magicoder's text2code output; several rows per task
    = several samples), in ``problems`` order."""
    by_id: dict[str, list[str]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise hep.DataError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
            raise hep.DataError(f"{path}:{n}: expected {{\"task_id\": ..., \"completion\": ...}}")
        by_id.setdefault(str(row["task_id"]), []).append(str(row["completion"]))
    missing = [p.task_id for p in problems if p.task_id not in by_id]
    if missing:
        raise hep.DataError(f"{path}: no completion for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return [by_id[p.task_id] for p in problems]


# ------------------------------------------------------------------------------------------------ CLI
def add_subparser(sub) -> None:
    """``megaocto eval magicoder``: registered by megaocto/commands/eval.py."""
    mg = sub.add_parser("magicoder", help="HumanEval(+) / MBPP(+) with Magicoder's prompt, greedy (pass@1)",
                        description=__doc__.split("\n\n")[0])
    src = mg.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="megaocto checkpoint directory to generate with")
    src.add_argument("--generations", help="JSONL {task_id, completion} rows (text after the pre-filled response)")
    data = mg.add_mutually_exclusive_group()
    data.add_argument("--data", default=None, help="EvalPlus problem file (HumanEvalPlus / MbppPlus .jsonl as "
                      "EvalPlus ships it), or HumanEvalPack python.jsonl / a directory with it (default: "
                      "$MEGAOCTO_HUMANEVALPACK or the hub dataset bigcode/humanevalpack)")
    data.add_argument("--sample", action="store_true", help="the 3 packaged HumanEvalPack Python problems (smoke run)")
    mg.add_argument("--limit", type=int, default=None, help="first K problems only")
    mg.add_argument("--max-new-tokens", type=int, default=512, help="default: %(default)s (Magicoder)")
    mg.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default: %(default)s)")
    mg.add_argument("--tokenizer", default=None, help="default: the checkpoint's data.tokenizer")
    mg.add_argument("--iteration", default=None, help="checkpoint iteration or 'release' (default: latest)")
    mg.add_argument("--workers", type=int, default=2, help="programs executed in parallel (default: %(default)s)")
    mg.add_argument("--timeout", type=float, default=None, help="per-program timeout in seconds (default: python's)")
    mg.add_argument("--output", default=None, help="directory for samples.jsonl, results.jsonl and summary.json")


def run_subcommand(args) -> int:
    """Exit 0 ok, 2 data/config errors (printed as one line)."""
    try:
        return _run(args)
    except (hep.DataError, ValueError, OSError) as e:
        print(f"megaocto eval: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--workers", args.workers), ("--limit", args.limit or 1)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1 (got {value})")
    problems, kind = load_problems(args.data, sample=args.sample)
    problems = problems[:args.limit]
    if args.generations:
        completions, rank = load_completions(args.generations, problems), 0
    else:
        completions, rank = _generate(args, problems)
    if rank != 0:
        return 0
    samples = [[solution(p, c) for c in comps] for p, comps in zip(problems, completions)]

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            print(f"executed {done}/{total}", file=sys.stderr, flush=True)

    result = evaluate(problems, samples, kind, workers=args.workers, timeout=args.timeout, progress=progress)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:  # evalplus.evaluate --samples reads these
            for p, comps, sols in zip(problems, completions, samples):
                for c, s in zip(comps, sols):
                    f.write(json.dumps({"task_id": p.task_id, "completion": c, "solution": s}) + "\n")
        with open(out / "results.jsonl", "w", encoding="utf-8") as f:
            for rec in result["problems"]:
                f.write(json.dumps(rec) + "\n")
        (out / "summary.json").write_text(json.dumps(result["summary"], indent=1))
    print(json.dumps(result["summary"]))
    return 0


def _generate(args, problems):
    import torch

    from megaocto.config.base import ConfigError
    from megaocto.generation.loading import load_model_and_tokenizer

    try:
        model, tokenizer, pc = load_model_and_tokenizer(args.load, tokenizer=args.tokenizer, iteration=args.iteration)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    with torch.no_grad():
        completions = generate_completions(model, tokenizer, problems, max_new_tokens=args.max_new_tokens,
                                           batch_size=args.batch_size, pc=pc)
    return completions, pc.rank
