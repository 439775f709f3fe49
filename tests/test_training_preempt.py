"""Preemption: SIGUSR1/SIGTERM -> finish the step, save, exit with EXIT_PREEMPTED; all ranks agree; resume works.

One real `megaocto train` subprocess (with DataLoader workers) gets SIGUSR1 (SLURM's pre-timeout signal) on its
whole process group while training; in-process runs
get SIGTERM at a known step (and, on 2 ranks, only rank 0 is signalled). Debug: the subprocess output is in the
assertion message.
"""
import io
import json
import os
import signal
import subprocess
import sys
import time

from dist_utils import run_distributed
from megaocto.config.loader import load_run_config
from megaocto import checkpoint as ckpt
from megaocto.training.loop import EXIT_PREEMPTED, Trainer, train

ARGS = ["--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--train.micro_batch_size", "2",
        "--train.dtype", "fp32", "--optimizer.lr", "1e-3", "--logging.log_interval", "1",
        "--model.hidden_dropout", "0.1", "--model.attention_dropout", "0.1"]  # dropout on: resume restores the RNG


def test_sigusr1_subprocess_saves_and_exits_with_requeue_code(tmp_path):
    save, run_dir = str(tmp_path / "ck"), tmp_path / "run"
    cmd = [sys.executable, "-m", "megaocto.cli", "train", *ARGS, "--train.iters", "100000",
           "--checkpoint.save", save, "--logging.run_dir", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    # Own session, signalled as a group (like SLURM): the 2 DataLoader workers must ignore it.
    proc = subprocess.Popen(cmd + ["--data.num_workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        os.killpg(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, out
    it = ckpt.read_tracker(save)
    logged = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert it == logged[-1] >= 2 and "preempted" in out, out
    # for launchers that do not see exit code 42 (torchrun reports 1): rank 0 leaves {run_dir}/exit_reason.json
    reason = json.load(open(run_dir / "exit_reason.json"))
    assert (reason["reason"], reason["exit_code"], reason["iteration"]) == ("preempted", EXIT_PREEMPTED, it), reason
    assert reason["checkpoint"] == os.path.join(save, ckpt.iter_dir_name(it)), reason
    meta = json.load(open(os.path.join(save, ckpt.iter_dir_name(it), ckpt.METADATA)))
    assert meta["reason"] == "preempted" and meta["consumed_samples"] == 2 * it
    resumed = train(load_run_config(None, [*ARGS, "--train.iters", "100000", "--train.exit_interval", str(it + 2),
                                           "--checkpoint.load", save, "--logging.run_dir", str(run_dir)]),
                    stream=io.StringIO())
    assert list(resumed.losses) == [it + 1, it + 2] and resumed.exit_code == 0
    reason = json.load(open(run_dir / "exit_reason.json"))
    assert (reason["reason"], reason["exit_code"], reason["iteration"]) == ("exit_interval", 0, it + 2), reason


def _signal_at(trainer: Trainer, step: int, only_rank: int | None = None):
    inner = trainer.train_step

    def wrapped(batches):
        out = inner(batches)
        if trainer.iteration + 1 == step and (only_rank is None or trainer.pc.rank == only_rank):
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    trainer.train_step = wrapped
    return trainer


def test_sigterm_in_process_saves_at_current_step(tmp_path):
    cfg = load_run_config(None, [*ARGS, "--train.iters", "10", "--checkpoint.save", str(tmp_path / "ck"),
                                 "--logging.run_dir", str(tmp_path / "run")])
    before = signal.getsignal(signal.SIGTERM)
    result = _signal_at(Trainer(cfg, stream=io.StringIO()), 3).run()
    assert (result.exit_code, result.exit_reason, result.iteration) == (EXIT_PREEMPTED, "preempted", 3)
    assert ckpt.read_tracker(str(tmp_path / "ck")) == 3
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    five = ("--train.iters", "10", "--train.exit_interval", "5", "--logging.run_dir", str(tmp_path / "run"))
    resumed = train(load_run_config(None, [*ARGS, *five, "--checkpoint.save", str(tmp_path / "ck")]),
                    stream=io.StringIO())
    straight = train(load_run_config(None, [*ARGS, *five]), stream=io.StringIO())
    assert list(resumed.losses) == [4, 5] and {**result.losses, **resumed.losses} == straight.losses, \
        "resume after preemption is not exact"
    timed = train(load_run_config(None, [*ARGS, "--train.iters", "10", "--train.exit_duration_mins", "0",
                                         "--checkpoint.save", str(tmp_path / "ck2"),
                                         "--logging.run_dir", str(tmp_path / "run")]), stream=io.StringIO())
    assert (timed.exit_code, timed.exit_reason, timed.iteration) == (EXIT_PREEMPTED, "exit_duration", 1)
    assert ckpt.read_tracker(str(tmp_path / "ck2")) == 1


def _dist_body(rank, world_size, root):
    cfg = load_run_config(None, [*ARGS, "--train.iters", "10", "--parallel.tp", "1", "--checkpoint.save", root,
                                 "--data.num_workers", "0",
                                 "--logging.run_dir", root + "_run"])
    result = _signal_at(Trainer(cfg, stream=io.StringIO()), 2, only_rank=0).run()
    assert (result.exit_code, result.iteration) == (EXIT_PREEMPTED, 2), f"rank {rank}: {result}"
    assert ckpt.read_tracker(root) == 2


def test_only_rank0_signalled_all_ranks_stop_together(tmp_path):
    run_distributed(_dist_body, 2, str(tmp_path / "ck"))
