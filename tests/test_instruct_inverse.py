"""Inverse-Instruct: InverseCoder's code extraction (counts per reason), prompts, seeded prefixes; batched
next-token logits equal each prompt's own forward (bigcode, glm2); LM-scores in (0, 1) and equal to a reference
softmax over the Yes/No token sets; the compat top-5 rule; top-1 selection; every stage on a tiny model
in-process (shapes, resumable rerun that adds nothing) and summarize + compat score through a real served model.
"""
import json
import math
import os

import pytest
import torch

from serving_utils import ServerProcess, tiny_checkpoint
from megaocto.instruct import inverse as inv
from megaocto.instruct.resumable import read_rows, rejected_path


def test_extract_code_as_inversecoder():
    assert inv.extract_code("Here:\n```python\ndef f():\n    pass\n```\nTest:\n```python\nf()\n```") == \
        ("```python\ndef f():\n    pass\n```", "fenced")
    assert inv.extract_code("x = 1\nprint(x)\n") == ("```python\nx = 1\nprint(x)\n```", "python")
    assert inv.extract_code("Use a loop. It works.") == (None, "no_code")
    # a single fence: upstream's slice stops before the last character
    assert inv.extract_code("see ```rust\nfn main() {}") == ("```rust\nfn main() {```", "fenced")
    assert inv.fence_language("```cpp\nint x;\n```") == "cpp" and inv.fence_language("```\nx\n```") == ""
    p = inv.summarize_prompt("```python\nx\n```")
    assert p.endswith("@@ Instruction\nThis is a response code snippet to a programming problem, please give the "
                      "problem description:\n```python\nx\n```\n\n@@ Response\n")
    assert inv.choose_prefix(42, 7, "```python\nx```").endswith(" python")
    assert inv.choose_prefix(42, 7, "```python\nx```") == inv.choose_prefix(42, 7, "```python\nx```")
    assert {inv.choose_prefix(42, r, "x") for r in range(50)} == set(inv.PREFIXES)
    s = inv.score_prompt("Write f.", "```python\nf```")
    assert "Here is a programming problem:\nWrite f.\n\nHere is the answer code to the problem:\n```python\nf```\n" \
           "Is the answer correct? Your reply should begin with Yes or No.\n\n@@ Response\n" in s


def test_compat_rule_and_selection():
    assert inv.compat_score({"Yes": math.log(0.6), "No": math.log(0.2)}) == pytest.approx(0.75)
    assert inv.compat_score({"Yes": math.log(0.6), "As": math.log(0.2)}) == pytest.approx(0.75)  # As fallback
    assert inv.compat_score({"No": -1.0}) == pytest.approx(math.exp(-100) / (math.exp(-100) + math.exp(-1)))
    assert inv.compat_score({}) == 0.5
    rows = [{"index": i, "code_index": i // 3, "instruction": f"i{i}", "response": f"c{i // 3}", "score": s}
            for i, s in enumerate([0.2, 0.9, 0.5, 0.7, 0.7, 0.1])]
    best = inv.select_best(rows)
    assert [(r["index"], r["instruction"], r["score"]) for r in best] == [(1, "i3", 0.7), (0, "i1", 0.9)]
    assert inv.select_best(rows, oss_prefix=True)[0]["instruction"].startswith(
        "Write a solution to the following coding problem:\n")


@pytest.mark.parametrize("family", ["tiny-bigcode", "tiny-glm2"])
def test_next_token_logits_and_lm_scores_equal_reference(family):
    from megaocto.config.model import ModelConfig
    from megaocto.generation import next_token_logits
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset(family, init_method_std=0.2), ParallelContext.single()).eval()
    prompts = [[5, 6, 7, 8, 9], [11, 12], [100, 200, 300, 400, 500, 600, 7]]
    got = next_token_logits(model, prompts, batch_size=2)
    assert got.shape == (3, model.cfg.vocab_size)
    yes, no = [3, 17, 40], [8, 99]
    scores = inv.lm_scores(got, yes, no)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([p]))[0, -1].float()[:model.cfg.vocab_size]
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)
        probs = torch.softmax(ref, dim=-1)
        expected = probs[yes].sum() / (probs[yes].sum() + probs[no].sum())
        assert 0 < scores[i] < 1 and float(scores[i]) == pytest.approx(float(expected), abs=1e-6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("inverse")), positions=512)


def _corpus(tmp_path):
    rows = [{"instruction": "Add.", "response": "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."},
            {"instruction": "Print.", "response": "print(1)\n"},
            {"instruction": "Explain.", "response": "It is a loop over the items."},
            {"instruction": "Mul.", "response": "```python\ndef mul(a, b):\n    return a * b\n```"}]
    path = tmp_path / "evol.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_all_stages_in_process(ckpt, tmp_path):
    from megaocto.cli import main
    from megaocto.generation import load_tokenizer

    load, tok_path = ckpt
    src = _corpus(tmp_path)
    out = str(tmp_path / "inverse.jsonl")
    args = ["instruct", "inverse-instruct", "--inputs", src, "--output", out, "--load", load, "--num-instructions",
            "3", "--max-new-tokens", "6", "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    work = out + ".work"
    codes = read_rows(os.path.join(work, "extract.jsonl"))
    assert [c["index"] for c in codes] == [0, 1, 3] and [c["extract"] for c in codes] == ["fenced", "python", "fenced"]
    assert [r["reason"] for r in read_rows(rejected_path(os.path.join(work, "extract.jsonl")))] == ["no_code"]
    summaries = read_rows(os.path.join(work, "summaries.jsonl"))
    assert sorted(r["index"] for r in summaries) == [0, 1, 2, 3, 4, 5, 9, 10, 11]
    for r in summaries:
        prefix = inv.choose_prefix(42, r["index"], r["response"])
        assert r["instruction"].startswith(prefix) and "```" not in r["instruction"][len(prefix):]
    scores = read_rows(os.path.join(work, "scores.jsonl"))
    assert len(scores) == 9 and all(0 < r["score"] < 1 for r in scores)
    # the scores are the LM-scores of the model's own logits
    from megaocto.generation import load_checkpoint_model, next_token_logits
    model, _ = load_checkpoint_model(load)
    tok = load_tokenizer(tok_path)
    yes, no = inv.answer_token_ids(tok, "yes"), inv.answer_token_ids(tok, "no")
    assert yes and no
    r = scores[0]
    logits = next_token_logits(model, [tok.encode(inv.score_prompt(r["instruction"], r["response"]))])
    assert r["score"] == pytest.approx(float(inv.lm_scores(logits, yes, no)[0]), abs=1e-6)
    final = [json.loads(x) for x in open(out)]
    assert sorted(f["index"] for f in final) == [0, 1, 3]
    for f in final:
        group = [s for s in scores if s["code_index"] == f["index"]]
        assert f["score"] == max(s["score"] for s in group) and set(f) >= {"instruction", "response"}
    assert [f["score"] for f in final] == sorted(f["score"] for f in final)
    # rerun: everything is done, nothing is generated again
    before = {p: open(os.path.join(work, p)).read() for p in ("summaries.jsonl", "scores.jsonl")}
    assert main(args) == 0
    assert before == {p: open(os.path.join(work, p)).read() for p in ("summaries.jsonl", "scores.jsonl")}


def test_summarize_and_compat_score_through_a_served_model(ckpt, tmp_path):
    from megaocto.cli import main

    load, tok_path = ckpt
    server = ServerProcess(load)
    try:
        src = _corpus(tmp_path)
        ext = str(tmp_path / "ext.jsonl")
        assert main(["instruct", "extract", "--inputs", src, "--output", ext]) == 0
        summ, sc = str(tmp_path / "summ.jsonl"), str(tmp_path / "score.jsonl")
        common = ["--teacher-url", server.url, "--teacher-model", "tiny", "--no-progress"]
        assert main(["instruct", "summarize", "--input", ext, "--output", summ, "--num-instructions", "2",
                     "--max-new-tokens", "5", *common]) == 0
        rows = read_rows(summ)
        assert len(rows) == 6 and all(r["finish_reason"] in ("stop", "length") for r in rows)
        assert main(["instruct", "score", "--input", summ, "--output", sc, "--tokenizer", tok_path, *common]) == 0
        scores = read_rows(sc)
        assert len(scores) == 6 and all(0 <= r["score"] <= 1 for r in scores)
        assert main(["instruct", "select", "--input", sc, "--output", str(tmp_path / "sel.jsonl")]) == 0
        assert len(read_rows(str(tmp_path / "sel.jsonl"))) == 3
    finally:
        server.kill()


def test_shards_then_merge(ckpt, tmp_path):
    from megaocto.cli import main

    load, _ = ckpt
    src = _corpus(tmp_path)
    out = str(tmp_path / "sharded.jsonl")
    base = ["instruct", "inverse-instruct", "--inputs", src, "--output", out, "--load", load, "--num-instructions",
            "2", "--max-new-tokens", "4", "--no-progress"]
    assert main(base + ["--shard", "1/2"]) == 0
    assert main(["instruct", "merge", "--output", out, "--shards", "2"]) == 2  # shard 0 never ran
    assert main(base + ["--shard", "0/2"]) == 0
    assert main(["instruct", "merge", "--output", out, "--shards", "2"]) == 0
    merged = read_rows(out)
    assert [r["index"] for r in merged] == [0, 1, 3] and all(0 < r["score"] < 1 for r in merged)


def test_in_process_tp2_under_torchrun(ckpt, tmp_path):
    import shutil
    import subprocess
    import sys

    from megaocto.cli import main
    from serving_utils import REPO, free_port

    load, tok_path = ckpt
    tp2 = str(tmp_path / "tp2")
    assert main(["convert", "reshard", "--load", load, "--tp", "2", "--output", tp2, "--quiet"]) == 0
    src = _corpus(tmp_path)
    out = str(tmp_path / "tp2.jsonl")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun if os.path.exists(torchrun) else shutil.which("torchrun"), "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "megaocto.cli", "instruct", "inverse-instruct", "--inputs", src,
           "--output", out, "--load", tp2, "--tokenizer", tok_path, "--num-instructions", "2", "--max-new-tokens", "4",
           "--no-progress"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('"stage": "select"') == 1  # rank 0 alone writes and reports
    summaries = read_rows(os.path.join(out + ".work", "summaries.jsonl"))
    assert len(summaries) == 6 and len({r["index"] for r in summaries}) == 6
    final = read_rows(out)
    assert [r["index"] for r in sorted(final, key=lambda r: r["index"])] == [0, 1, 3]
    assert all(0 < r["score"] < 1 for r in final)
