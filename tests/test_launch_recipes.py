"""launch/finetune.sh with the Magicoder / InverseCoder recipes on tiny-llama (PRESET=tiny): MODEL=inversecoder
runs stage 1 (1 epoch) then stage 2 (2 epochs, from stage 1's weights) in one job; a preemption in stage 1 resumes
stage 1, a preemption in stage 2 resumes stage 2 from its own checkpoint (stage 1 is skipped, not re-run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llama_reference import write_codellama_tokenizer
from megaocto.config.loader import load_run_config
from megaocto.data.preprocess import PreprocessConfig, preprocess
from test_launch_local import FINETUNE, ROOT, WAIT_S, train_rows

STOP_AFTER_ONE_STEP = "--train.exit_duration_mins 0.000001"  # the trainer saves and exits 42, as on SIGUSR1


def _data(tmp_path: Path) -> dict:
    tok = write_codellama_tokenizer(str(tmp_path / "tok"))
    out = {"tok": tok}
    for name, n in (("self", 16), ("orig", 8)):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"instruction": f"Write {name} function {i}.",
                                           "response": f"def f{i}():\n    return {i}\n"}) + "\n" for i in range(n)))
        preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / name), tokenizer=tok,
                                    format="instruction-response", log_interval=0), log=lambda m: None)
        out[name] = str(tmp_path / name)
    return out


def _run(tmp_path: Path, data: dict, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MEGAOCTO_ROOT=str(ROOT), PYTHON=sys.executable, PRESET="tiny", MODEL="inversecoder",
               NPROC_PER_NODE="1", OMP_NUM_THREADS="1", RUN_DIR=str(tmp_path / "run"), TOKENIZER=data["tok"],
               STAGE1_DATA_PATHS=data["self"], STAGE2_DATA_PATHS=data["orig"], **extra)
    return subprocess.run(["bash", str(FINETUNE), "--logging.tensorboard", "false"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=WAIT_S)


def _tracker(stage: Path) -> int:
    return int((stage / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())


def test_inversecoder_two_stages_resume_the_preempted_stage(tmp_path):
    data = _data(tmp_path)
    s1, s2 = tmp_path / "run" / "stage1", tmp_path / "run" / "stage2"

    # A: preempted in stage 1 after its first step: exit 42, stage 2 not started
    a = _run(tmp_path, data, STAGE1_ARGS=STOP_AFTER_ONE_STEP)
    assert a.returncode == 42, a.stdout[-3000:] + a.stderr[-3000:]
    assert _tracker(s1) == 1 and not s2.exists()
    assert "inversecoder stage 1 of 2" in a.stdout and "stage 2 of 2" not in a.stdout

    # B: stage 1 resumes at step 1 and finishes (16 examples / batch 4 = 4 steps); stage 2 starts from stage 1's
    # final weights, fresh optimizer, and is preempted after its first step
    b = _run(tmp_path, data, STAGE2_ARGS=STOP_AFTER_ONE_STEP)
    assert b.returncode == 42, b.stdout[-3000:] + b.stderr[-3000:]
    assert f"resuming from iter_0000001 in {s1}/checkpoints" in b.stdout
    assert f"loaded model weights from iter_0000004 in {s1}/checkpoints" in b.stdout
    assert _tracker(s1) == 4 and _tracker(s2) == 1
    assert json.loads((s1 / "exit_reason.json").read_text())["reason"] == "finished"
    stage1_rows = train_rows(s1)
    assert [r["iteration"] for r in stage1_rows] == [1, 2, 3, 4]

    # C: the requeued job skips the finished stage 1 and resumes stage 2 from ITS checkpoint (8 examples x 2
    # epochs / batch 4 = 4 steps)
    c = _run(tmp_path, data)
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    assert "inversecoder stage 1 already finished" in c.stdout
    assert f"resuming from iter_0000001 in {s2}/checkpoints" in c.stdout
    assert train_rows(s1) == stage1_rows  # stage 1 did not run again
    assert [r["iteration"] for r in train_rows(s2)] == [1, 2, 3, 4] and _tracker(s2) == 4
    assert json.loads((s2 / "exit_reason.json").read_text())["reason"] == "finished"


def test_recipe_models_pick_their_configs_and_refuse_shared_stage_settings(tmp_path):
    stub = tmp_path / "python"  # the real interpreter for the launcher's helpers; the "trainer" prints its args
    stub.write_text(f'#!/bin/bash\nif [ "$1" = - ]; then exec {sys.executable} "$@"; fi\necho "TRAIN $*"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MEGAOCTO_ROOT=str(ROOT), PYTHON=str(stub), NPROC_PER_NODE="1")
    for model, config in (("magicoder", "magicoder-ds-6.7b.yaml"), ("magicoder-s", "magicoder-s-ds-6.7b.yaml")):
        out = subprocess.run(["bash", str(FINETUNE)], env={**env, "MODEL": model}, cwd=tmp_path, capture_output=True,
                             text=True, timeout=WAIT_S)
        assert out.returncode == 0 and f"--config {ROOT}/launch/configs/{config}" in out.stdout, out.stdout + out.stderr
    bad = subprocess.run(["bash", str(FINETUNE)], env={**env, "MODEL": "inversecoder", "SAVE": "x"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=WAIT_S)
    assert bad.returncode == 2 and "STAGE1_DATA_PATHS and STAGE2_DATA_PATHS instead of SAVE" in bad.stderr


def test_recipe_configs_are_the_papers_settings():
    m = load_run_config(str(ROOT / "launch" / "configs" / "magicoder-ds-6.7b.yaml"))
    assert (m.model.seq_length, m.train.global_batch_size, m.train.epochs, m.optimizer.lr) == (1216, 512, 2, 5e-5)
    assert (m.optimizer.name, m.optimizer.adafactor_scale_parameter, m.optimizer.clip_grad) == ("adafactor", False, 0)
    assert (m.schedule.style, m.schedule.warmup_iters, m.train.dtype) == ("linear", 15, "bf16")
    assert (m.data.packing, m.data.packed_overlong) == (False, "head")
    s = load_run_config(str(ROOT / "launch" / "configs" / "magicoder-s-ds-6.7b.yaml"))
    assert s.model.seq_length == 1024 and s.checkpoint.load == m.checkpoint.save and s.checkpoint.finetune
    i1, i2 = (load_run_config(str(ROOT / "launch" / "configs" / f"inversecoder-ds-6.7b-stage{k}.yaml")) for k in (1, 2))
    assert (i1.train.epochs, i2.train.epochs) == (1, 2) and i2.checkpoint.load == i1.checkpoint.save
    assert i2.data.paths == s.data.paths  # stage 2 = the original Evol-Instruct data
