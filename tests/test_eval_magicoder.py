"""`megaocto eval magicoder`: Magicoder's HumanEval / MBPP prompts byte for byte (reference §1.9), the completion cut
at the first closing fence and scored as prompt + completion, HumanEvalPack's Python tests, EvalPlus problem files
(base and plus inputs against the canonical solution), and greedy generation through a tiny Llama."""
import json

import pytest
import torch

from megaocto.cli import main as cli_main
from megaocto.eval import magicoder as mg
from megaocto.eval.humanevalpack import SAMPLE_DIR

SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently delivers accurate and reliable "
          "responses to user instructions.")

# Two problems in the EvalPlus release layout (HumanEvalPlus / MbppPlus jsonl rows)
EVALPLUS_ROWS = [
    {"task_id": "HumanEval/900", "entry_point": "halve",
     "prompt": 'def halve(x: float) -> float:\n    """Half of x.\n    >>> halve(3.0)\n    1.5\n    """\n',
     "canonical_solution": "    return x / 2\n", "contract": "", "atol": 0,
     "base_input": [[3.0], [1.0]], "plus_input": [[1e-9], [7.3], [-2.5]]},
    {"task_id": "Mbpp/901", "entry_point": "count_pos",
     "prompt": '"""\nWrite a function to count the positive numbers in a list\nassert count_pos([1, -2, 3]) == 2\n"""\n',
     "canonical_solution": "def count_pos(xs):\n    return sum(1 for x in xs if x > 0)\n", "atol": 0,
     "base_input": [[[1, -2, 3]], [[]]], "plus_input": [[[0, 0, 5]], [[-1]]]},
]


def _sample_rows():
    return [json.loads(line) for line in (SAMPLE_DIR / "python.jsonl").read_text().splitlines() if line.strip()]


def test_humaneval_prompt_is_magicoders_byte_for_byte():
    problems, kind = mg.load_problems(sample=True)
    assert kind == "humanevalpack" and len(problems) == 3
    row = _sample_rows()[0]
    p = row["prompt"].strip()
    want = (f"{SYSTEM}\n\n@@ Instruction\nWrite a solution to the following problem:\n```python\n{p}\n```\n\n"
            f"@@ Response\n```python\n{p}")
    assert problems[0].prompt == want
    assert mg.solution(problems[0], "\n    return 1\n```\nThis works because...") == row["prompt"] + "\n    return 1\n"


def test_mbpp_prompt_from_an_evalplus_row(tmp_path):
    path = tmp_path / "MbppPlus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in EVALPLUS_ROWS))
    problems, kind = mg.load_problems(str(path))
    assert kind == "evalplus" and [p.dataset for p in problems] == ["humaneval", "mbpp"]
    want = (f"{SYSTEM}\n\n@@ Instruction\nWrite a function to count the positive numbers in a list. Your code should "
            f"satisfy the following assertion:\n```python\nassert count_pos([1, -2, 3]) == 2\n```\n\n"
            f"@@ Response\n```python")
    assert problems[1].prompt == want
    assert mg.solution(problems[1], "\ndef count_pos(xs): ...\n```") == "\ndef count_pos(xs): ...\n"


def test_humanevalpack_scoring_of_canonical_and_wrong_completions(tmp_path, capsys):
    rows = _sample_rows()
    gens = tmp_path / "gens.jsonl"
    lines = [{"task_id": r["task_id"], "completion": "\n" + r["canonical_solution"] + "```\n\nExplanation."}
             for r in rows[:2]]
    lines.append({"task_id": rows[2]["task_id"], "completion": "\n    return None\n```"})
    gens.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert cli_main(["eval", "magicoder", "--sample", "--generations", str(gens), "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pass@1"] == pytest.approx(2 / 3) and summary["protocol"] == "magicoder"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["solution"] == rows[0]["prompt"] + "\n" + rows[0]["canonical_solution"]
    assert json.loads((out / "summary.json").read_text()) == summary


def test_evalplus_file_base_and_plus(tmp_path, capsys):
    path = tmp_path / "plus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in EVALPLUS_ROWS))
    gens = tmp_path / "gens.jsonl"
    rows = [  # halve: right up to rounding (within atol 1e-6); count_pos: right on base, wrong on plus ([0, 0, 5])
        {"task_id": "HumanEval/900", "completion": "\n    return x * 0.5 + 1e-12\n```"},
        {"task_id": "Mbpp/901", "completion": "\ndef count_pos(xs):\n    return sum(1 for x in xs if x >= 0)\n```"},
    ]
    gens.write_text("".join(json.dumps(x) + "\n" for x in rows))
    assert cli_main(["eval", "magicoder", "--data", str(path), "--generations", str(gens)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["data"] == "evalplus" and summary["base_pass@1"] == 1.0 and summary["plus_pass@1"] == 0.5
    problems, _ = mg.load_problems(str(path))
    wrong = mg.evaluate(problems[:1], [[mg.solution(problems[0], "\n    return x / 3\n")]], "evalplus")
    assert wrong["summary"]["base_pass@1"] == 0.0 and wrong["summary"]["plus_pass@1"] == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({k: v for k, v in EVALPLUS_ROWS[0].items() if k != "entry_point"}) + "\n")
    assert cli_main(["eval", "magicoder", "--data", str(bad), "--generations", str(gens)]) == 2
    assert "missing EvalPlus fields ['entry_point']" in capsys.readouterr().err


def test_greedy_generation_with_a_llama_tokenizer_starts_with_bos(tmp_path, monkeypatch):
    from llama_reference import write_codellama_tokenizer
    from megaocto.config.model import ModelConfig
    from megaocto.data.tokenizer import load_tokenizer
    import importlib

    gen_module = importlib.import_module("megaocto.generation.generate")
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    tok = load_tokenizer(write_codellama_tokenizer(str(tmp_path / "tok")))
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size, seq_length=512,
                                                max_position_embeddings=512), ParallelContext.single()).eval()
    seen = []
    real = gen_module.generate

    def spy(model, prompts, gen, *a, **k):
        seen.extend(prompts)
        assert gen.temperature == 0.0 and "```" in gen.stop
        return real(model, prompts, gen, *a, **k)

    monkeypatch.setattr(gen_module, "generate", spy)
    problems, _ = mg.load_problems(sample=True)
    with torch.no_grad():
        comps = mg.generate_completions(model, tok, problems[:2], max_new_tokens=6, batch_size=2)
    assert len(comps) == 2 and all(len(c) == 1 and "```" not in c[0] for c in comps)
    assert [s[0] for s in seen] == [tok.bos, tok.bos]
    assert seen[0][1:] == tok.encode(problems[0].prompt)
