"""The README's main job, shrunk: the whole pipeline end to end on a small repository."""
import json
import os

import megaocto.parallel
from megaocto.demo import DemoConfig, run_demo
from megaocto.demo_repo import make_demo_repo


def test_demo_pipeline_end_to_end(tmp_path):
    repo = make_demo_repo(tmp_path / "repo", os.path.dirname(megaocto.parallel.__file__))
    lines = []
    summary = run_demo(DemoConfig(workdir=str(tmp_path / "work"), repo=str(repo), vocab_size=600,
                                  seq_length=256, iters=4, global_batch_size=4, micro_batch_size=2,
                                  extra=["--train.dtype", "fp32"]), log=lines.append)
    assert summary["exit_code"] == 0 and summary["iterations"] == 4
    assert summary["kept_commits"] >= 20 and summary["commits"] > summary["kept_commits"]
    assert summary["val_loss"] is not None and summary["last_loss"] < summary["first_loss"] + 0.5
    run = tmp_path / "work" / "run"
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)
    assert any(line.startswith("[6/6]") for line in lines)


def test_demo_checks_training_overrides_before_the_pipeline(tmp_path, capsys):
    import pytest

    from megaocto.cli import main
    from megaocto.config.base import ConfigError

    lines = []
    with pytest.raises(ConfigError, match=r"training run config: command line --train\.itres: unknown key"):
        run_demo(DemoConfig(workdir=str(tmp_path / "work"), extra=["--train.itres", "5"]), log=lines.append)
    assert lines == [] and not (tmp_path / "work").exists()  # nothing ran
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--section.field VALUE arguments go to the training run" in capsys.readouterr().out


def test_demo_cli_reports_a_too_small_repository_without_a_traceback(tmp_path, capsys):
    import subprocess

    from megaocto.cli import main

    repo = tmp_path / "small"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(3):
        (repo / "a.py").write_text("".join(f"def f{j}():\n    return {j}\n" for j in range(i + 1)))
        subprocess.run([*git, "add", "a.py"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", f"Add function number {i} to the module"], check=True)
    code = main(["demo", "--workdir", str(tmp_path / "work"), "--repo", str(repo), "--vocab-size", "512"])
    err = capsys.readouterr().err
    assert code == 1
    assert "megaocto demo: failed: only" in err and "use --repo with a larger history" in err, err
    assert str(tmp_path / "work") in err
