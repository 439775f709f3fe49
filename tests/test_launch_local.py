"""launch/finetune.sh without SLURM: a local torchrun of the tiny preset at tp=2 on 2 CPU processes that learns,
and the script's preemption path (a signal to the launcher shell -> checkpoint, exit 42 -> the same command
resumes). The straight-to-the-end runs are in tests/test_launch_slurm.py and `make demo`.

`build_tiny_datasets` is shared with tests/test_launch_slurm.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "launch" / "finetune.sh"
WAIT_S = 300  # generous: the machine is shared; nothing below asserts on time


def launch_env(run_dir: Path, **extra: str) -> dict:
    """Environment for a tiny launcher run whose run dir, checkpoints and python are all explicit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MEGAOCTO_ROOT=str(ROOT), PYTHON=sys.executable, PRESET="tiny", TP="2", RUN_DIR=str(run_dir),
               SAVE=str(run_dir / "checkpoints"), LOAD=str(run_dir / "checkpoints"), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def latest_checkpoint(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip())


def wait_for_iteration(run_dir: Path, at_least: int, proc_alive=lambda: True) -> int:
    """Block until metrics.jsonl logs an iteration >= at_least (the trainer's signal handlers are installed)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        its = [r["iteration"] for r in train_rows(run_dir)]
        if its and max(its) >= at_least:
            return max(its)
        assert proc_alive(), "the launcher exited before the run reached the iteration to interrupt at"
        time.sleep(0.2)
    raise AssertionError(f"no iteration >= {at_least} logged in {run_dir}/metrics.jsonl within {WAIT_S} s")


def build_tiny_datasets(out: Path) -> dict:
    """A BPE tokenizer and .bin/.idx datasets from a small replayed git history (megaocto/parallel's sources):
    {'tokenizer', 'vocab_size', 'gpt_prefix' (commits-pretrain text), 'packed_prefix' (commits-finetune)}."""
    import megaocto.parallel
    from megaocto.data.git_commits import extract_commits
    from megaocto.data.preprocess import PreprocessConfig, preprocess
    from megaocto.data.tokenizer import train_bpe_tokenizer
    from megaocto.demo_repo import make_demo_repo

    out.mkdir(parents=True, exist_ok=True)
    repo = make_demo_repo(out / "repo", os.path.dirname(megaocto.parallel.__file__))
    commits = str(out / "commits.jsonl")
    extract_commits(str(repo), commits)
    tok = str(out / "tokenizer.json")
    info = train_bpe_tokenizer([commits], 600, tok, json_keys=("old_contents", "new_contents", "subject"))
    preprocess(PreprocessConfig(inputs=[commits], output_prefix=str(out / "pre"), tokenizer=tok,
                                format="commits-pretrain", workers=1, log_interval=0), log=lambda m: None)
    preprocess(PreprocessConfig(inputs=[commits], output_prefix=str(out / "ft"), tokenizer=tok,
                                format="commits-finetune", workers=1, log_interval=0), log=lambda m: None)
    return {"tokenizer": tok, "vocab_size": info["vocab_size"], "gpt_prefix": str(out / "pre_text_document"),
            "packed_prefix": str(out / "ft")}


def test_finetune_sh_runs_tiny_tp2_locally_and_resumes_after_a_signal(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--logging.log_interval", "2", "--logging.tensorboard", "false", "--eval.interval", "0",
              "--checkpoint.save_interval", "0", "--schedule.warmup_iters", "2"]
    env = launch_env(run_dir, ITERS="2000")

    # 1. A local torchrun of 2 CPU processes (tp=2) trains; SIGUSR1 to the launcher shell (SLURM's pre-timeout
    #    signal) is forwarded to torchrun's workers, which save and exit 42; the launcher reports 42 (torchrun
    #    itself would say 1, the launcher reads exit_reason.json).
    proc = subprocess.Popen(["bash", str(FINETUNE), *common], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_iteration(run_dir, 12, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 42, out[-3000:]
    assert "local torchrun: 2 processes" in out and "forwarding to torchrun" in out
    rows = train_rows(run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, rows  # it learns
    reason = json.loads((run_dir / "exit_reason.json").read_text())
    stopped = reason["iteration"]
    assert reason["reason"] == "preempted" and reason["exit_code"] == 42
    assert reason["consumed_samples"] == stopped * 8  # global batch 8
    assert latest_checkpoint(run_dir) == stopped and stopped < 2000
    assert (run_dir / "checkpoints" / f"iter_{stopped:07d}").is_dir()

    # 2. The same command resumes at the saved step and data position (exit_interval stops it 2 steps later).
    again = subprocess.run(["bash", str(FINETUNE), *common, "--train.exit_interval", str(stopped + 2)], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from iter_{stopped:07d}" in again.stdout
    after = [r for r in train_rows(run_dir) if r["iteration"] > stopped]
    assert after and after[0]["iteration"] <= stopped + 2
    assert all(r["consumed_samples"] == r["iteration"] * 8 for r in after)
    assert latest_checkpoint(run_dir) == stopped + 2
    assert json.loads((run_dir / "exit_reason.json").read_text())["reason"] == "exit_interval"


def test_demo_launcher_options_are_checked_before_anything_runs(tmp_path):
    from megaocto.config.base import ConfigError
    from megaocto.demo import DemoConfig, run_demo

    lines: list[str] = []
    with pytest.raises(ConfigError, match="--tp > 1 needs --launcher"):
        run_demo(DemoConfig(workdir=str(tmp_path / "w"), tp=2), log=lines.append)
    with pytest.raises(ConfigError, match="--launcher nope.sh: no such file"):
        run_demo(DemoConfig(workdir=str(tmp_path / "w"), launcher="nope.sh"), log=lines.append)
    assert lines == [] and not (tmp_path / "w").exists()


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _stub_python(tmp_path: Path, trainer: str) -> Path:
    """A PYTHON for the launcher: the real interpreter for its own helpers (`python - ...`), TRAINER (bash) in
    place of `python -m megaocto.cli torchrun ...` / `python -m megaocto.cli train ...`."""
    stub = tmp_path / "python"
    _stub(stub, f'if [ "$1" = - ]; then exec {sys.executable} "$@"; fi\n{trainer}\n')
    return stub


def _exit_reason(run_dir: Path, code: int, age_s: float) -> str:
    """Bash that writes run_dir/exit_reason.json as the trainer does, timed age_s before the moment it runs."""
    return (f'echo "{{\\"reason\\": \\"preempted\\", \\"exit_code\\": {code}, '
            f'\\"time\\": $(( $(date +%s) - {int(age_s)} ))}}" > {run_dir}/exit_reason.json')


@pytest.mark.parametrize("trainer_exit, record_age, expected", [
    (3, None, 3),        # a plain failure keeps its code
    (1, 0.0, 42),        # torchrun's 1 + the trainer's fresh exit_reason.json 42: preempted
    (1, 3600.0, 1),      # a 42 recorded before this run started is not this run's: stays 1
    (0, None, 0),
])
def test_launcher_exit_code_from_the_trainer_and_its_exit_reason(tmp_path, trainer_exit, record_age, expected):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = ""
    if record_age is not None:
        record = _exit_reason(run_dir, 42, record_age)
        if record_age > 0:  # written before the launcher starts
            subprocess.run(["bash", "-c", record], check=True)
            record = ""
    py = _stub_python(tmp_path, f"{record}\nexit {trainer_exit}")
    proc = subprocess.run(["bash", str(FINETUNE)], env=launch_env(run_dir, PYTHON=str(py)), capture_output=True,
                          text=True, timeout=WAIT_S)
    assert proc.returncode == expected, proc.stdout + proc.stderr
    assert "local torchrun: 2 processes" in proc.stdout
    assert ("preempted: checkpoint saved; run the same command again to resume" in proc.stdout) == (expected == 42)


def test_launcher_under_slurm_multinode_master_from_first_node_and_requeue_on_42(tmp_path):
    """SLURM mode with stub srun/scontrol on PATH (the real-SLURM runs are single-node): a 2-node job takes
    MASTER_ADDR from the FIRST node's NodeAddr, MASTER_PORT from the job id, runs the trainer once per task through
    srun, and turns the trainer's 42 into `scontrol requeue <job>` and exit 0."""
    bin_dir, run_dir, calls = tmp_path / "bin", tmp_path / "run", tmp_path / "calls"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", f"""echo "scontrol $*" >> {calls}
case "$1 $2" in
  "show hostnames") [ "$3" = "gpu[07-08]" ] && printf 'gpu07\\ngpu08\\n' ;;
  "show node") echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.1.0.${{3#gpu}} NodeHostName=$3" ;;
  "show job") echo "JobId=$3 JobName=octo-finetune"; echo "   JobState=RUNNING Reason=None" ;;
esac
exit 0
""")
    _stub(bin_dir / "srun", f'echo "srun $* MASTER=$MASTER_ADDR:$MASTER_PORT" >> {calls}\nexit 42\n')
    env = launch_env(run_dir, MODEL="octogeex", PRESET="", PATH=f"{bin_dir}:{os.environ['PATH']}",
                     SLURM_JOB_ID="123456", SLURM_NTASKS="16", SLURM_JOB_NODELIST="gpu[07-08]",
                     SLURM_CPUS_PER_TASK="8")
    proc = subprocess.run(["bash", str(FINETUNE), "--train.iters", "60"], env=env, capture_output=True, text=True,
                          timeout=WAIT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = calls.read_text().splitlines()
    srun = [line for line in log if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith("MASTER=10.1.0.07:18456"), log  # 15000 + 123456 % 20000
    assert f"--kill-on-bad-exit=1 {sys.executable} -m megaocto.cli train --config " in srun[0]
    assert "launch/configs/octogeex-6b.yaml" in srun[0] and srun[0].split(" MASTER=")[0].endswith("--train.iters 60")
    assert "scontrol show node gpu07" in log and "scontrol requeue 123456" in log, log
    assert "16 tasks, one per GPU" in proc.stdout


def test_launcher_under_a_partial_slurm_environment_says_what_is_missing(tmp_path):
    env = launch_env(tmp_path / "run", SLURM_JOB_ID="7", SLURM_NTASKS="2")
    proc = subprocess.run(["bash", str(FINETUNE)], env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "SLURM_JOB_NODELIST is not" in proc.stdout and "MEGAOCTO_LOCAL=1" in proc.stdout


def test_save_override_alone_moves_the_tiny_presets_load_too(tmp_path):
    """`SAVE=/x bash launch/finetune.sh` with PRESET=tiny (whose config loads from its own save dir): the trainer
    gets checkpoint.load = /x too (not the preset's runs/... dir, which does not exist -> a config error). The
    stub trainer prints the config `megaocto train` resolves from the launcher's exact arguments."""
    save = tmp_path / "elsewhere" / "ck"
    trainer = ('while [ "$1" != train ]; do shift; done; shift\n'
               f'exec {sys.executable} -m megaocto.cli train "$@" --print-config')
    env = launch_env(tmp_path / "run", PYTHON=str(_stub_python(tmp_path, trainer)), SAVE=str(save))
    del env["LOAD"]
    proc = subprocess.run(["bash", str(FINETUNE)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=WAIT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"  save: {save}\n  load: {save}\n" in proc.stdout, proc.stdout
    assert f"checkpoint.save {save}, checkpoint.load {save}" in proc.stdout  # the launcher says so up front
