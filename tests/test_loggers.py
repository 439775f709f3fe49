"""megaocto/training/loggers.py: W&B arguments (config vs WANDB_* precedence, one run across SLURM requeues) with a
fake `wandb` module (no network, no W&B service), and the TensorBoard config/hparams read back from the event files.
"""
from __future__ import annotations

import inspect
import io
import os
import sys
import types
from pathlib import Path

import pytest

from megaocto.config.loader import config_to_dict, load_run_config
from megaocto.training.loggers import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "launch" / "configs" / "tiny-bigcode.yaml")
WANDB_ENV = ("WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_GROUP", "SLURM_JOB_ID",
             "SLURM_CLUSTER_NAME")


@pytest.fixture
def fake_wandb(monkeypatch):
    """A `wandb` module recording each init's arguments; a clean W&B/SLURM environment."""
    try:  # the real signature, to check megaocto passes only arguments wandb.init has
        import wandb as real

        params = set(inspect.signature(real.init).parameters)
    except ImportError:
        params = None
    inits = []

    class Run:
        def __init__(self, kwargs):
            self.id = kwargs.get("id") or "generated"
            self.logged = []

        def log(self, data, step=None):
            self.logged.append((step, data))

        def finish(self):
            pass

    def init(**kwargs):
        if params is not None:
            assert set(kwargs) <= params, set(kwargs) - params
        inits.append(kwargs)
        return Run(kwargs)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    return inits


def _open(tmp_path, *overrides, run_dir="run"):
    cfg = load_run_config(TINY, ["--logging.run_dir", str(tmp_path / run_dir), "--logging.tensorboard", "false",
                                 "--logging.wandb", "true", *overrides])
    log = MetricsLogger(cfg.logging, enabled=True, run_config=config_to_dict(cfg), stream=io.StringIO())
    log.close()
    return cfg


def test_wandb_project_env_wins_over_the_default_but_not_over_the_config(tmp_path, fake_wandb, monkeypatch):
    _open(tmp_path)
    assert fake_wandb[-1]["project"] == "megaocto"  # nothing set: megaocto's default
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    _open(tmp_path)
    assert fake_wandb[-1]["project"] == "from-env"  # the env beats the default
    _open(tmp_path, "--logging.wandb_project", "from-config")
    assert fake_wandb[-1]["project"] == "from-config"  # a set field beats the env, as wandb.init(project=...)
    # unset fields go to wandb as None, so W&B itself reads WANDB_ENTITY / WANDB_NAME / WANDB_RUN_GROUP
    assert fake_wandb[-1]["entity"] is None and fake_wandb[-1]["name"] is None and fake_wandb[-1]["group"] is None
    assert fake_wandb[-1]["config"]["optimizer"]["lr"] == 1e-3  # the whole resolved config


def test_requeued_slurm_parts_continue_one_wandb_run(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _open(tmp_path)  # the first part of the job ...
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _open(tmp_path)  # ... and its requeued part: same job id, same run dir
    first, again = fake_wandb[-2:]
    assert first["id"] == again["id"] and first["id"].startswith("slurm-4242-")
    assert first["resume"] == again["resume"] == "allow"
    _open(tmp_path, run_dir="other")  # a second training in the same allocation is another W&B run
    assert fake_wandb[-1]["id"].startswith("slurm-4242-") and fake_wandb[-1]["id"] != first["id"]
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "jean zay")  # job ids repeat across clusters
    _open(tmp_path)
    assert fake_wandb[-1]["id"].startswith("slurm-jean_zay-4242-")

    monkeypatch.setenv("WANDB_RUN_ID", "from-env")  # the user's id beats the derived one ...
    _open(tmp_path)
    assert fake_wandb[-1]["id"] == "from-env"
    _open(tmp_path, "--logging.wandb_id", "from-config")  # ... and the config's beats both
    assert fake_wandb[-1]["id"] == "from-config" and fake_wandb[-1]["resume"] == "allow"


def test_without_slurm_or_an_id_wandb_makes_a_new_run(tmp_path, fake_wandb):
    _open(tmp_path)
    assert fake_wandb[-1]["id"] is None and fake_wandb[-1]["resume"] == "allow"


def test_tensorboard_gets_the_flattened_config_as_text_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = load_run_config(TINY, ["--logging.run_dir", str(tmp_path), "--train.iters", "7"])
    log = MetricsLogger(cfg.logging, enabled=True, run_config=config_to_dict(cfg), stream=io.StringIO())
    log.log_train(1, {"loss": 2.5, "consumed_samples": 8})
    log.close()

    tb_dirs = {Path(root) for root, _, files in os.walk(tmp_path / "tensorboard") if files}
    assert tb_dirs == {tmp_path / "tensorboard"}  # one run: no add_hparams sub-run directory
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| `optimizer.lr` | `0.001` |" in text and "| `train.iters` | `7` |" in text
    assert "| `data.paths` | `[]` |" in text

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["train.iters"].number_value == 7
    assert start.hparams["model.family"].string_value == "bigcode"
    assert start.hparams["data.paths"].string_value == "[]"
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in exp.metric_infos} == {"train/loss", "valid/val_loss"}
    assert "_hparams_/session_end_info" in content  # a clean close ends the session
