"""OSS-Instruct: Magicoder's snippet extraction, byte-identical prompt, parser and cleaning; a run against a
scripted OpenAI-compatible server (request contents, retries on 429/500, outcome counts), resumption after
SIGKILL mid-run equal to an uninterrupted run (no row lost or duplicated), --shard K/N + merge, fingerprint
refusal; end to end against a real `megaocto serve` tiny model on snippets from ../shared/data/commits.
"""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from serving_utils import REPO, ScriptedTeacher, ServerProcess, chat_response, tiny_checkpoint
from megaocto.instruct import oss
from megaocto.instruct.resumable import ResumeError, merge_shards, read_rows, rejected_path, shard_path
from megaocto.instruct.teacher import TeacherConfig

COMMITS = "/work/shared/data/commits/psf__requests.jsonl"


def test_prompt_is_magicoders_bytes():
    # sha256 of ise-uiuc/magicoder data/prompt.txt (709 characters, no trailing newline)
    assert len(oss.PROMPT_TEMPLATE) == 709
    assert hashlib.sha256(oss.PROMPT_TEMPLATE.encode()).hexdigest() == \
        "37119e47070be2fdb7269955ede52eba207e3594b36f9a62133086b6f18fb083"
    p = oss.build_prompt("x = 1\n")
    assert "Code snippet for inspiration:\n```\nx = 1\n\n```\n\nGuidelines" in p and "[Code Snippet]" not in p
    assert oss.SYSTEM.startswith("You are exceptionally skilled at crafting")


def test_snippets_as_magicoder():
    docs = [("python", "".join(f"line {i}\n" for i in range(n))) for n in (30, 1, 5, 0, 40)] * 500  # 2500 docs
    seeds = oss.build_seeds(iter(docs), seed=976, chunk_size=1000)
    # reference: module-level random reseeded per chunk of 1000 as in Magicoder's batched map
    expected = []
    for i, (_, d) in enumerate(docs):
        if i % 1000 == 0:
            random.seed(976 + i)
        lines = d.splitlines(keepends=True)
        if not lines:
            expected.append("")
            continue
        start = random.choice(range(len(lines)))
        n = random.randint(1, 15)
        expected.append("".join(lines[start:start + n]))
    order = np.random.default_rng(976).permutation(len(docs))
    assert [s.raw_index for s in seeds] == order.tolist() and [s.lang_index for s in seeds] == list(range(2500))
    assert [s.seed for s in seeds] == [expected[r] for r in order]
    lens = [len(s.seed.splitlines()) for s in seeds if docs[s.raw_index][1].count("\n") >= 30]
    assert min(lens) >= 1 and max(lens) == 15
    # quotas per language, languages numbered globally in sorted order
    mixed = oss.build_seeds(iter([("rust", "a\nb\n")] * 3 + [("cpp", "c\n")] * 4), quotas={"cpp": 2})
    assert [(s.lang, s.index, s.lang_index) for s in mixed] == [("cpp", 0, 0), ("cpp", 1, 1), ("rust", 2, 0),
                                                                 ("rust", 3, 1), ("rust", 4, 2)]


def test_parser_and_clean():
    text = "Intro\n[Problem Description] lost text\nWrite f.\n\n[Solution]\n```python\ndef f(): pass\n```\n"
    assert oss.parse_problem_solution(text) == ("Write f.", "```python\ndef f(): pass\n```")
    assert oss.parse_problem_solution("[PROBLEM DESCRIPTION]\nP\n[solution]\nS") == ("P", "S")
    assert oss.parse_problem_solution("[Solution]\nS\n[Problem Description]\nP") is None
    assert oss.parse_problem_solution("no headers") is None
    assert oss.parse_problem_solution("[Problem Description]\n[Solution]\nS") == ("", "S")
    rows = [{"lang": "python", "seed": f"s{i}", "problem": f"p{i}", "solution": f"x{i}"} for i in range(6)]
    rows += [{"lang": "python", "seed": "s 0", "problem": "new", "solution": "new"},          # dup seed
             {"lang": "python", "seed": "z", "problem": "p\n1", "solution": "other"},        # dup problem
             {"lang": "python", "seed": "y", "problem": "q", "solution": " x2 "},            # dup solution
             {"lang": "python", "seed": "w", "response": "[Problem Description]\nR\n[Solution]\nRS"},
             {"lang": "python", "seed": "v", "response": "garbage"}]
    kept, rejected, counts = oss.clean(rows)
    assert counts["kept"] == 7 and counts["unparsable"] == 1
    assert counts["duplicate seeds"] + counts["duplicate problems"] + counts["duplicate solutions"] == 3
    # first occurrence in the seed-666 shuffle wins
    shuffled = list(rows)
    random.Random(666).shuffle(shuffled)
    first = [r for r in shuffled if r.get("seed") in ("s0", "s 0")][0]
    assert any(k["seed"] == first["seed"] for k in kept)
    assert {"problem": "R", "solution": "RS"}.items() <= next(k for k in kept if k["seed"] == "w").items()


# ------------------------------------------------------------------------------------------ scripted teacher
def _answer(body, attempt):
    seed = body["seed"]
    if seed % 3 == 0 and attempt == 0:
        return 429, {"error": {"message": "slow down"}}
    if seed % 4 == 0 and attempt == 0:
        return 500, {"error": {"message": "boom"}}
    code = body["messages"][1]["content"].split("```\n", 1)[1].split("\n```", 1)[0]
    if seed % 5 == 0:
        return 200, chat_response("I cannot follow the format")
    if seed % 7 == 0:
        return 200, chat_response("[Problem Description]\ncut", "length")
    return 200, chat_response(f"[Problem Description]\nProblem about {code!r} ({seed})\n\n[Solution]\nsolve({seed})")


def _seed_dir(tmp_path, n=24):
    d = tmp_path / "src"
    d.mkdir()
    for i in range(n):
        (d / f"m{i:02d}.py").write_text("".join(f"x_{i}_{j} = {j}\n" for j in range(20)))
    (d / "notes.txt").write_text("ignored\n")
    return str(d)


def _cli(args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "megaocto.cli", "instruct", "oss-instruct", *args,
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_scripted_teacher_requests_counts_and_resume_after_kill(tmp_path):
    src = _seed_dir(tmp_path)
    teacher = ScriptedTeacher(_answer, delay_s=0.05)
    try:
        common = ["--seeds", src, "--teacher-url", teacher.url, "--teacher-model", "scripted", "--backoff", "0.01",
                  "--concurrency", "2", "--teacher-context", "1200"]
        ref = str(tmp_path / "ref.jsonl")
        p = _cli(common + ["--output", ref])
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        summary = json.loads(out)
        c = summary["outcomes"]
        assert summary["complete"] and summary["seeds"] == 24
        assert c["ok"] + c["unparsable"] + c["not_stop"] + c["too_long"] == 24 and c["failed"] == 0
        assert c["unparsable"] >= 2 and c["not_stop"] >= 1 and c["ok"] >= 10, c
        # the requests: Magicoder's messages byte for byte, seed 976 + index, max_tokens from the context
        first = {r["seed"]: r for r in teacher.requests}
        assert set(first) == {976 + i for i in range(24)} - {976 + r["index"] for r in read_rows(rejected_path(ref))
                                                              if r["reason"] == "too_long"}
        r0 = next(iter(first.values()))
        assert r0["messages"][0] == {"role": "system", "content": oss.SYSTEM}
        assert r0["messages"][1]["content"].startswith(oss.PROMPT_TEMPLATE.split("{code}")[0])
        assert r0["temperature"] == 0.0 and r0["n"] == 1 and r0["model"] == "scripted"
        assert r0["max_tokens"] == 1200 - len(r0["messages"][1]["content"].encode()) - 10  # byte-count fallback
        assert sum(1 for v in teacher.attempts.values() if v > 0) >= 8  # 429/500 were retried

        # kill mid-run, rerun the same command, compare with the uninterrupted run
        out_path = str(tmp_path / "out.jsonl")
        p = _cli(common + ["--output", out_path])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.exists(out_path) and len(read_rows(out_path)) >= 4:
                break
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        partial = len(read_rows(out_path)) + len(read_rows(rejected_path(out_path)))
        assert 0 < partial < 24
        p = _cli(common + ["--output", out_path])
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        resumed = json.loads(out)
        assert resumed["resumed"] == partial and sum(resumed["outcomes"].values()) == 24 - partial
        for path in (out_path, rejected_path(out_path)):
            a, b = read_rows(path), read_rows(path.replace("out.jsonl", "ref.jsonl"))
            assert len({r["index"] for r in a}) == len(a)  # no duplicates
            assert sorted(a, key=lambda r: r["index"]) == sorted(b, key=lambda r: r["index"])

        # other settings on the same output: refused, nothing written
        p = _cli(common + ["--output", out_path, "--temperature", "0.5"])
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and "other settings (differs in: temperature" in err
    finally:
        teacher.close()


def test_shards_merge_to_the_unsharded_output(tmp_path):
    src = _seed_dir(tmp_path, 10)
    teacher = ScriptedTeacher(lambda body, attempt: _answer(body, 1))
    try:
        tcfg = TeacherConfig(url=teacher.url, model="scripted", backoff_s=0.01)
        cfg = oss.OSSConfig(teacher_context=8192)
        full = str(tmp_path / "full.jsonl")
        assert oss.run_oss_instruct([src], full, tcfg, cfg, progress=False)["complete"]
        out = str(tmp_path / "sharded.jsonl")
        oss.run_oss_instruct([src], out, tcfg, cfg, shard=(0, 3), progress=False)
        with pytest.raises(ResumeError, match="shard-1-of-3.jsonl \\(never started\\)"):
            merge_shards(out, 3)
        for k in (1, 2):
            s = oss.run_oss_instruct([src], out, tcfg, cfg, shard=(k, 3), progress=False)
            assert s["output"] == shard_path(out, (k, 3)) and s["seeds"] in (3, 4)
        assert merge_shards(out, 3) == {"shards": 3, "kept": len(read_rows(full)),
                                        "rejected": len(read_rows(rejected_path(full)))}
        assert read_rows(out) == sorted(read_rows(full), key=lambda r: r["index"])
    finally:
        teacher.close()


def test_end_to_end_against_real_tiny_server(tmp_path):
    load, tok = tiny_checkpoint(str(tmp_path), positions=1024)
    server = ServerProcess(load, "--chat-template", "magicoder")
    try:
        out = str(tmp_path / "oss.jsonl")
        from megaocto.cli import main

        rc = main(["instruct", "oss-instruct", "--seeds", COMMITS, "--content-key", "new_contents", "--lang", "python",
                   "--default-quota", "4", "--output", out, "--teacher-url", server.url, "--teacher-model", "tiny",
                   "--max-new-tokens", "8", "--teacher-context", "1024", "--count-tokenizer", tok, "--no-progress",
                   "--concurrency", "4"])
        assert rc == 0
        rows, rejected = read_rows(out), read_rows(rejected_path(out))
        assert len(rows) + len(rejected) == 4
        # an untrained tiny model does not stop within 8 tokens nor write the headers: the counts say so
        assert {r["reason"] for r in rejected} <= {"not_stop", "unparsable", "empty"} and len(rejected) == 4
        assert all(r["response"] for r in rejected if r["reason"] == "not_stop")
    finally:
        server.kill()


def test_a_teacher_row_with_a_lone_surrogate_is_rejected_not_a_crash(tmp_path):
    """A JSON escape like "\\ud800" in a teacher's answer decodes to a string that UTF-8 cannot hold: the row goes to
    the rejected file as "unencodable" (counted there), the run goes on and resumes past it."""
    from megaocto.instruct.resumable import ResumableOutput, read_rows, rejected_path

    path = str(tmp_path / "out.jsonl")
    out = ResumableOutput(path, "fp", {"a": 1})
    assert out.write({"index": 0, "problem": "ok"}, kept=True) is True
    assert out.write({"index": 1, "problem": "bad \ud800"}, kept=True) is False
    out.close([0, 1])
    assert [r["index"] for r in read_rows(path)] == [0]
    rejected = read_rows(rejected_path(path))
    assert rejected[0]["index"] == 1 and rejected[0]["reason"] == "unencodable" and "problem" in rejected[0]["error"]
    assert ResumableOutput(path, "fp", {"a": 1}).done == {0, 1}
