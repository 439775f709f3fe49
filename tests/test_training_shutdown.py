"""A failing or interrupted `megaocto train` with DataLoader workers exits promptly and leaves no processes behind.

The workers ignore SIGTERM/SIGUSR1 (SLURM signals the whole step), so the loop must shut them down itself on every
exit; they also die with their parent (PR_SET_PDEATHSIG on Linux). Debug: the subprocess output is in the message.
"""
import json
import os
import signal
import subprocess
import sys
import time

ARGS = ["--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--train.micro_batch_size", "2",
        "--train.dtype", "fp32", "--logging.log_interval", "1", "--data.num_workers", "2"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _session_alive(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split() and int(line.split()[1]) == sid]


def _start(tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "megaocto.cli", "train", *ARGS, "--logging.run_dir", str(tmp_path / "run"), *extra]
    # A shell's background job inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt:
    # give the run the default disposition so the test means the same wherever pytest was started from.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finish(proc, timeout=30):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        left = _session_alive(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"megaocto train did not exit within {timeout}s (processes: {left}):\n{out}")
    deadline = time.time() + 10  # workers are reaped by the main process before it exits; allow a moment
    while _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = _session_alive(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}\n{out}"
    return out


def _start_running(tmp_path):
    """A long run, returned once it has logged a step and its DataLoader workers are up."""
    proc = _start(tmp_path, "--train.iters", "100000")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    assert len(_children(proc.pid)) >= 2, "expected the DataLoader workers to be running"
    return proc


def test_exception_in_the_loop_exits_and_leaves_no_workers(tmp_path):
    # token ids up to 4999 with a 1000-token model: the embedding lookup raises at step 1
    proc = _start(tmp_path, "--train.iters", "5", "--data.synthetic_vocab_size", "5000", "--model.vocab_size", "1000")
    out = _finish(proc)
    assert proc.returncode == 1, out
    assert "model.vocab_size" in out, out


def test_sigint_exits_and_leaves_no_workers(tmp_path):
    proc = _start_running(tmp_path)
    os.kill(proc.pid, signal.SIGINT)  # the main process only: its workers must not be orphaned
    out = _finish(proc)
    assert proc.returncode != 0, out
    reason = json.loads((tmp_path / "run" / "exit_reason.json").read_text())
    assert reason["reason"] == "interrupted" and reason["exit_code"] == 130, reason


def test_workers_die_with_a_killed_trainer(tmp_path):
    proc = _start_running(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # like torchrun after its grace period: no cleanup code runs
    _finish(proc)
