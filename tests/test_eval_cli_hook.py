"""`megaocto eval humanevalpack` end to end (subprocess) and the training hook with a tiny model."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest

from eval_data import humanevalpack_dir
from megaocto.eval import humanevalpack as hep


def _megaocto(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaocto.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_generations_canonical_python_scores_one(tmp_path):
    data = humanevalpack_dir()
    problems = hep.load_problems("python", data)[:30]
    with open(tmp_path / "gens.jsonl", "w") as f:
        for p in problems:
            ws = p["prompt"][len(p["prompt"].rstrip()):]  # what the final .strip() of the prompt removed
            f.write(json.dumps({"task_id": p["task_id"], "completion": ws + p["canonical_solution"]}) + "\n")
    out = tmp_path / "out"
    proc = _megaocto("eval", "humanevalpack", "--task", "synthesize", "--lang", "python", "--generations",
                     str(tmp_path / "gens.jsonl"), "--data-dir", str(data), "--limit", "30", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pass@1"] == 1.0 and summary["problems"] == 30 and "pass@10" not in summary
    rows = [json.loads(line) for line in (out / "synthesize-python.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [p["task_id"] for p in problems]
    assert all(r["correct"] == 1 and r["samples"][0]["status"] == "passed" for r in rows)
    assert json.loads((out / "synthesize-python.summary.json").read_text())["pass@1"] == 1.0
    # the harness-format file written next to it scores the same when read back (post-processed code as is);
    # one sample broken -> pass@1 drops to 4/5
    gens = json.loads((out / "synthesize-python.generations.json").read_text())[:5]
    gens[0] = [gens[0][0].replace("return", "return not", 1)]
    (tmp_path / "harness.json").write_text(json.dumps(gens))
    proc = _megaocto("eval", "humanevalpack", "--task", "synthesize", "--lang", "python", "--generations",
                     str(tmp_path / "harness.json"), "--data-dir", str(data), "--limit", "5")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["pass@1"] == pytest.approx(0.8)


def test_cli_packaged_sample_runs_offline(tmp_path):
    """--sample: the 3 Python problems shipped in the package (no ../shared needed); canonical answers score 1,
    the buggy ones 0; other languages are refused with a message naming the sample; the README carries the license."""
    assert (hep.SAMPLE_DIR / "README.md").read_text().count("MIT License") == 1
    problems = hep.load_problems("python", hep.SAMPLE_DIR)
    assert [p["task_id"] for p in problems] == ["Python/23", "Python/45", "Python/53"]
    for body, expected in (("canonical_solution", 1.0), ("buggy_solution", 0.0)):
        with open(tmp_path / "gens.jsonl", "w") as f:
            for p in problems:
                ws = p["prompt"][len(p["prompt"].rstrip()):]
                f.write(json.dumps({"task_id": p["task_id"], "completion": ws + p[body]}) + "\n")
        proc = _megaocto("eval", "humanevalpack", "--task", "synthesize", "--lang", "python", "--generations",
                         str(tmp_path / "gens.jsonl"), "--sample")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["pass@1"] == expected and summary["problems"] == 3, summary
        assert "not a benchmark" in proc.stderr
    proc = _megaocto("eval", "humanevalpack", "--task", "synthesize", "--lang", "js", "--generations",
                     str(tmp_path / "gens.jsonl"), "--sample")
    assert proc.returncode == 2 and "holds python only" in proc.stderr, proc.stderr
    proc = _megaocto("eval", "humanevalpack", "--task", "synthesize", "--lang", "python", "--generations",
                     str(tmp_path / "gens.jsonl"), "--sample", "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


def test_cli_errors_name_the_problem(tmp_path):
    data = humanevalpack_dir()
    proc = _megaocto("eval", "humanevalpack", "--task", "synthesize", "--lang", "python", "--generations",
                     str(tmp_path / "missing.json"), "--data-dir", str(data))
    assert proc.returncode == 2 and "missing.json" in proc.stderr and "megaocto eval: error:" in proc.stderr
    proc = _megaocto("eval", "humanevalpack", "--task", "explain-synthesize", "--lang", "python", "--generations",
                     str(tmp_path / "g.json"), "--data-dir", str(data))
    assert proc.returncode == 2 and "--descriptions" in proc.stderr
    proc = _megaocto("eval", "humanevalpack", "--task", "fix-tests", "--lang", "python", "--template", "continue",
                     "--generations", str(tmp_path / "g.json"), "--data-dir", str(data))
    assert proc.returncode == 2 and "only for synthesize" in proc.stderr
    proc = _megaocto("eval", "humanevalpack", "--task", "synthesize", "--lang", "python")
    assert proc.returncode == 2 and "--load" in proc.stderr  # one of --load / --generations is required


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from megaocto.data.tokenizer import train_bpe_tokenizer

    corpus = [f"def add_{i}(a, b):\n    return a + b * {i}\n" for i in range(200)]
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_bpe_tokenizer(corpus, 400, path)
    return path


def test_training_hook_logs_pass_at_k(tmp_path, tokenizer_path):
    from megaocto.config.loader import load_run_config
    from megaocto.training.loop import train

    data = hep.SAMPLE_DIR  # the packaged sample: runs on a fresh clone without ../shared
    run = tmp_path / "run"
    cfg = load_run_config(None, [
        "--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--data.kind", "synthetic",
        "--data.tokenizer", tokenizer_path, "--train.iters", "2", "--train.micro_batch_size", "2",
        "--train.global_batch_size", "2", "--train.dtype", "fp32", "--logging.run_dir", str(run),
        "--data.num_workers", "0", "--eval.humanevalpack.enabled", "true", "--eval.humanevalpack.interval", "1",
        "--eval.humanevalpack.limit", "2", "--eval.humanevalpack.max_new_tokens", "8",
        "--eval.humanevalpack.data_dir", str(data), "--eval.humanevalpack.n_samples", "2"])
    stream = io.StringIO()
    train(cfg, stream=stream)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [1, 2]
    for r in evals:
        assert 0.0 <= r["synthesize/python/pass@1"] <= 1.0
        assert "synthesize/python/pass@10" not in r  # n_samples 2: only k <= 2
    assert "humanevalpack at iter 2 | synthesize/python/pass@1" in stream.getvalue()
    rows = [json.loads(line) for line in (run / "humanevalpack" / "iter_0000002" / "synthesize-python.jsonl")
            .read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["Python/23", "Python/45"] and all(r["n"] == 2 for r in rows)
    assert all(len(r["completions"]) == 2 for r in rows)
    summary = json.loads((run / "humanevalpack" / "iter_0000002" / "summary.json").read_text())
    assert summary["iteration"] == 2 and summary["synthesize/python"]["samples"] == 4


def test_hook_config_errors_are_config_errors(tmp_path):
    from megaocto.config.base import ConfigError
    from megaocto.config.loader import load_run_config

    with pytest.raises(ConfigError, match="eval.humanevalpack.tasks: unknown"):
        load_run_config(None, ["--model.preset", "tiny-bigcode", "--train.iters", "1",
                               "--eval.humanevalpack.tasks", "fix-everything"])
    with pytest.raises(ConfigError, match="explain-synthesize needs descriptions"):
        load_run_config(None, ["--model.preset", "tiny-bigcode", "--train.iters", "1",
                               "--eval.humanevalpack.tasks", "explain-synthesize"])
    cfg = load_run_config(None, ["--model.preset", "tiny-bigcode", "--train.iters", "1", "--data.kind", "synthetic",
                                 "--logging.run_dir", str(tmp_path), "--eval.humanevalpack.enabled", "true"])
    from megaocto.training.loop import train

    with pytest.raises(ConfigError, match="needs a tokenizer"):
        train(cfg, stream=io.StringIO())


def test_cli_load_explain_describe_then_synthesize(tmp_path, tokenizer_path):
    """--load: descriptions from a checkpoint, then explain-synthesize reads them (2 problems, 4 new tokens)."""
    from megaocto.config.loader import load_run_config
    from megaocto.training.loop import train

    data = humanevalpack_dir()
    save = str(tmp_path / "ckpt")
    train(load_run_config(None, [
        "--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--data.kind", "synthetic",
        "--data.tokenizer", tokenizer_path, "--train.iters", "1", "--train.micro_batch_size", "2",
        "--train.global_batch_size", "2", "--train.dtype", "fp32", "--logging.run_dir", str(tmp_path / "run"),
        "--logging.jsonl", "false", "--data.num_workers", "0", "--checkpoint.save", save]), stream=io.StringIO())
    common = ["--lang", "python", "--load", save, "--data-dir", str(data), "--limit", "2", "--max-new-tokens", "4"]
    proc = _megaocto("eval", "humanevalpack", "--task", "explain-describe", *common, "--output", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    # generation reports progress (done/total, rate, ETA) as execution does
    assert re.search(r"\[eval generate\] 2/2 samples \(100%\), [0-9.]+ samples/s, elapsed \d:\d\d:\d\d, ETA 0:00:00",
                     proc.stderr), proc.stderr
    descs = json.loads((tmp_path / "d" / "explain-describe-python.generations.json").read_text())
    assert len(descs) == 2 and all(len(d) == 1 and isinstance(d[0], str) for d in descs)
    proc = _megaocto("eval", "humanevalpack", "--task", "explain-synthesize", *common, "--n", "2", "--k", "1,2,10",
                     "--descriptions",
                     str(tmp_path / "d" / "explain-describe-python.generations.json"), "--output", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert "[eval generate] 4/4 samples" in proc.stderr and "[eval execute] 4/4 programs" in proc.stderr, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 4 and 0.0 <= summary["pass@1"] <= summary["pass@2"] <= 1.0 and "pass@10" not in summary
    rows = [json.loads(line) for line in (tmp_path / "s" / "explain-synthesize-python.jsonl").read_text().splitlines()]
    assert all(r["n"] == 2 and len(r["completions"]) == 2 for r in rows)
    # every sample is the declaration plus what the model wrote
    assert all(s["code"].startswith(p["declaration"].rstrip()) for r, p in
               zip(rows, hep.load_problems("python", data)) for s in r["samples"])


def _tp2_hook_body(rank, world_size, tok_path, data_dir, out_dir):
    import torch
    import torch.distributed as dist

    from megaocto.config.eval import EvalConfig, HumanEvalPackConfig
    from megaocto.config.model import ModelConfig
    from megaocto.eval.hook import HumanEvalPackHook
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    pc = ParallelContext.init(tp=2)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny-bigcode", init_method_std=0.2), pc)
    cfg = EvalConfig(humanevalpack=HumanEvalPackConfig(enabled=True, limit=2, max_new_tokens=6, n_samples=2,
                                                       data_dir=data_dir, output_dir=out_dir, temperature=0.8))
    logged = []
    hook = HumanEvalPackHook(cfg, tokenizer_path=tok_path, run_dir=out_dir, pc=pc, total_iters=1,
                             log=lambda it, m, secs: logged.append((it, m, secs)))
    assert hook.due(1)
    metrics = hook.run(model, 1)
    assert len(logged) == 1 and logged[0][0] == 1 and logged[0][1] == metrics and logged[0][2] >= 0
    if rank == 0:
        assert set(metrics) == {"synthesize/python/pass@1"}
    else:
        assert metrics == {}  # execution and logging happen on rank 0 only
    # both TP ranks generated the same samples
    from megaocto.eval.hook import generate_samples

    samples, raw = generate_samples(model, hook.tokenizer, "synthesize", "python", hook.problems["python"],
                                    hook.settings, pc)
    both = [None, None]
    dist.all_gather_object(both, raw, group=pc.tp_group)
    assert both[0] == both[1] and len(raw) == 2 and all(len(r) == 2 for r in raw)


def test_hook_at_tp2_generates_on_both_ranks_and_scores_on_rank0(tmp_path, tokenizer_path):
    from dist_utils import run_distributed

    run_distributed(_tp2_hook_body, 2, tokenizer_path, str(humanevalpack_dir()), str(tmp_path / "hep"))
    rows = (tmp_path / "hep" / "iter_0000001" / "synthesize-python.jsonl").read_text().splitlines()
    assert len(rows) == 2


def test_log_eval_is_public_and_skips_empty_metrics(tmp_path):
    """MetricsLogger.log_eval: JSONL kind "eval" + console line; {} (a non-scoring rank) logs nothing."""
    from megaocto.config.train import LoggingConfig
    from megaocto.training.loggers import MetricsLogger

    stream = io.StringIO()
    log = MetricsLogger(LoggingConfig(run_dir=str(tmp_path)), enabled=True, stream=stream)
    log.log_eval(3, {})
    log.log_eval(4, {"synthesize/python/pass@1": 0.25}, elapsed=1.5)
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iteration"], r["synthesize/python/pass@1"]) for r in records] == [("eval", 4, 0.25)]
    assert stream.getvalue().strip() == "humanevalpack at iter 4 | synthesize/python/pass@1 0.2500 | 1.5s"


def test_demo_eval_step_falls_back_to_the_packaged_sample(monkeypatch, tmp_path):
    """make demo on a fresh clone (no ../shared, no $MEGAOCTO_HUMANEVALPACK): step 8 runs on --sample and says so;
    with data found it passes --data-dir instead."""
    from megaocto import demo

    calls: list[list[str]] = []

    def fake(args, log, **kw):
        calls.append(list(args))
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(demo, "_megaocto", fake)
    monkeypatch.setattr(demo, "find_humanevalpack", lambda cfg: None)
    lines: list[str] = []
    cfg = demo.DemoConfig(eval_limit=2)
    out = demo.run_eval_hook(cfg, str(tmp_path), "ckpt", "tok.json", lines.append, 8)
    assert out == {"eval_dir": str(tmp_path / "eval")}
    assert "--sample" in calls[0] and "--data-dir" not in calls[0]
    assert any("humanevalpack-sample" in line and "not a benchmark" in line for line in lines), lines
    monkeypatch.setattr(demo, "find_humanevalpack", lambda cfg: "/data/hep")
    demo.run_eval_hook(cfg, str(tmp_path), "ckpt", "tok.json", lines.append, 8)
    assert calls[1][calls[1].index("--data-dir") + 1] == "/data/hep" and "--sample" not in calls[1]


def test_progress_lines_show_done_total_rate_and_eta():
    """The progress callback of generation and execution: first and last call always print, others at most once
    per `every` seconds (a fake clock: no timing in the test)."""
    from megaocto.eval.progress import Progress

    now = [100.0]
    out = io.StringIO()
    bar = Progress("generate", "samples", every=10.0, stream=out, clock=lambda: now[0])
    for done, t in ((1, 102.0), (2, 104.0), (5, 110.0), (8, 116.0), (10, 120.0)):
        now[0] = t
        bar(done, 10)
    lines = out.getvalue().splitlines()
    assert lines == ["[eval generate] 1/10 samples (10%), 0.50 samples/s, elapsed 0:00:02, ETA 0:00:18",
                     "[eval generate] 8/10 samples (80%), 0.50 samples/s, elapsed 0:00:16, ETA 0:00:04",
                     "[eval generate] 10/10 samples (100%), 0.50 samples/s, elapsed 0:00:20, ETA 0:00:00"]


def test_generate_samples_reports_progress_without_changing_the_samples(tokenizer_path):
    """progress(done, total) after each decoded batch, in samples; the samples are the same with or without it."""
    import torch

    from megaocto.config.model import ModelConfig
    from megaocto.eval.hook import SampleSettings, generate_samples
    from megaocto.generation import load_tokenizer
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    pc = ParallelContext.single()
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny-bigcode", init_method_std=0.2), pc)
    tok = load_tokenizer(tokenizer_path)
    problems = hep.load_problems("python", humanevalpack_dir())[:3]
    settings = SampleSettings(n_samples=2, temperature=0.8, max_new_tokens=4, batch_size=4)
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        plain = generate_samples(model, tok, "synthesize", "python", problems, settings, pc)
        reported = generate_samples(model, tok, "synthesize", "python", problems, settings, pc,
                                    progress=lambda done, total: calls.append((done, total)))
    assert plain == reported
    assert calls == [(4, 6), (6, 6)]
