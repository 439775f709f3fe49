"""launch/*.sh under a real SLURM controller on this machine (launch/local_slurm.sh: slurmctld + slurmd + munge).

Skipped with the reason when SLURM is not installed or cannot be brought up; `make test` sets
MEGAOCTO_REQUIRE_SLURM=1, which turns that skip into a failure. The cluster is brought up once per session and,
when this module started it, stopped again by the PIDs `local_slurm.sh up` recorded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_launch_local import (ROOT, WAIT_S, build_tiny_datasets, launch_env, latest_checkpoint, train_rows,
                               wait_for_iteration)

LOCAL_SLURM = ROOT / "launch" / "local_slurm.sh"
# A CPU-only cluster: no GPUs, one task (process) per CPU, 2 tasks = tp 2.
CPU_JOB = ["--gpus-per-node", "0", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--time", "15"]


def _unavailable(reason: str):
    if os.environ.get("MEGAOCTO_REQUIRE_SLURM") == "1":
        pytest.fail(f"MEGAOCTO_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _cluster_idle() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in ("idle", "mix", "alloc") for s in out.stdout.split())


@pytest.fixture(scope="module")
def slurm_cluster():
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        _unavailable("SLURM is not installed (sudo bash launch/local_slurm.sh install, or `make test`)")
    started = False
    if not _cluster_idle():
        if os.geteuid() != 0:
            _unavailable("a local SLURM cluster needs root to start (launch/local_slurm.sh up)")
        up = subprocess.run(["bash", str(LOCAL_SLURM), "up"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MEGAOCTO_SLURM_NO_INSTALL": "1"})
        if up.returncode != 0:
            _unavailable(f"launch/local_slurm.sh up failed: {up.stdout[-1500:]} {up.stderr[-1500:]}")
        started = True
    yield
    if started:
        subprocess.run(["bash", str(LOCAL_SLURM), "down"], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_datasets(tmp_path_factory.mktemp("slurm_data"))


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    m = re.search(rf"\b{name}=(\S+)", out)
    return m.group(1) if m else ""


def wait_until(pred, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def sbatch(script: str, env: dict, cwd: Path, *args: str, wait: bool) -> subprocess.Popen:
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *CPU_JOB, str(ROOT / "launch" / script), *args]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_log(cwd: Path, job_id: str) -> str:
    logs = list(cwd.glob(f"*-{job_id}.out"))
    return logs[0].read_text() if logs else ""


def test_sbatch_wait_tiny_finetune_and_pretrain(slurm_cluster, tiny_data, tmp_path):
    common = ["--logging.log_interval", "2", "--logging.tensorboard", "false", "--eval.interval", "0",
              "--model.vocab_size", str(tiny_data["vocab_size"]), "--model.seq_length", "128",
              "--model.max_position_embeddings", "128"]
    ft_run, pre_run = tmp_path / "ft", tmp_path / "pre"
    ft_env = launch_env(ft_run, ITERS="24", DATA_PATHS=tiny_data["packed_prefix"], TOKENIZER=tiny_data["tokenizer"])
    pre_env = launch_env(pre_run, ITERS="24", DATA_PATHS=tiny_data["gpt_prefix"], TOKENIZER=tiny_data["tokenizer"])
    # Both jobs at once (4 CPUs advertised, 2 tasks each); `sbatch --wait` returns the job's exit code.
    ft = sbatch("finetune.sh", ft_env, tmp_path, "--data.kind", "packed", *common, wait=True)
    pre = sbatch("pretrain_santacoderpack.sh", pre_env, tmp_path, *common, wait=True)
    results = {}
    for name, proc in (("finetune", ft), ("pretrain", pre)):
        out, err = proc.communicate(timeout=WAIT_S)
        job_id = out.strip().splitlines()[0] if out.strip() else "?"
        results[name] = (proc.returncode, job_id, err)
    for name, run_dir in (("finetune", ft_run), ("pretrain", pre_run)):
        rc, job_id, err = results[name]
        log = job_log(tmp_path, job_id)
        assert rc == 0, f"{name} job {job_id}: sbatch rc {rc} {err}\n{log[-4000:]}"
        assert job_field(job_id, "JobState") in ("COMPLETED", ""), job_id  # "" once slurmctld purged the record
        assert "2 tasks, one per GPU" in log and "srun --kill-on-bad-exit=1" in log, log[-3000:]
        rows = train_rows(run_dir)
        assert rows[-1]["iteration"] == 24 and rows[-1]["loss"] < rows[0]["loss"] - 0.2, (name, rows)
        assert latest_checkpoint(run_dir) == 24
    pre_cfg = json.loads((pre_run / "config.json").read_text())["data"]
    assert pre_cfg["kind"] == "gpt" and pre_cfg["fim_rate"] == 0.5, pre_cfg  # PRESET=tiny pretraining: FIM on
    assert "kind=gpt" in job_log(tmp_path, results["pretrain"][1])
    assert "kind=packed" in job_log(tmp_path, results["finetune"][1])


def test_scancel_signal_checkpoints_requeues_and_resumes(slurm_cluster, tiny_data, tmp_path):
    """SIGTERM to the job's tasks (what preemption sends) -> the trainer saves and exits 42 -> the launcher runs
    `scontrol requeue` -> the same job id runs again and resumes at the saved step and data position."""
    run_dir = tmp_path / "run"
    env = launch_env(run_dir, ITERS="5000")
    args = ["--logging.log_interval", "2", "--logging.tensorboard", "false", "--eval.interval", "0",
            "--checkpoint.save_interval", "0"]
    proc = sbatch("finetune.sh", env, tmp_path, *args, wait=False)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    job_id = out.strip().splitlines()[0]
    try:
        wait_for_iteration(run_dir, 4, lambda: job_field(job_id, "JobState") in ("PENDING", "RUNNING",
                                                                                 "CONFIGURING"))
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=30)
        wait_until(lambda: job_field(job_id, "Restarts") not in ("", "0"), f"job {job_id} to be requeued")
        reason = json.loads((run_dir / "exit_reason.json").read_text())
        stopped = reason["iteration"]
        assert reason["reason"] == "preempted" and reason["exit_code"] == 42, reason
        assert reason["consumed_samples"] == stopped * 8  # global batch 8
        assert latest_checkpoint(run_dir) == stopped
        # The requeued run logs its resume and trains on from the checkpoint's step and data position.
        wait_until(lambda: any(r["iteration"] > stopped + 2 for r in train_rows(run_dir)),
                   f"job {job_id} to train again after the requeue")
        log = job_log(tmp_path, job_id)
        assert "exiting with code 42 (requeue)" in log and f"scontrol requeue {job_id}" in log, log[-3000:]
        assert "(restart 1)" in log and f"resuming from iter_{stopped:07d}" in log, log[-3000:]
        after = [r for r in train_rows(run_dir) if r["iteration"] > stopped]
        assert after[0]["iteration"] <= stopped + 2
        assert all(r["consumed_samples"] == r["iteration"] * 8 for r in after)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    # A plain scancel is a cancel, not a preemption: the launcher must not requeue it.
    wait_until(lambda: job_field(job_id, "JobState") in ("CANCELLED", "COMPLETED", "FAILED", ""),
               f"job {job_id} to end after scancel")
    time.sleep(2)
    assert job_field(job_id, "JobState") != "PENDING", job_log(tmp_path, job_id)[-2000:]
