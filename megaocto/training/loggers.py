"""Metric sinks: stdout, {run_dir}/metrics.jsonl, TensorBoard, W&B. Only the logging rank creates one.
It also writes the resolved run config to {run_dir}/config.json.

metrics.jsonl (this module owns the format): one JSON object per line, appended across resumes:
    {"kind": "train", "iteration": 10, "consumed_samples": 80, "loss": 2.31, "lr": ..., "grad_norm": ..., ...}
    {"kind": "valid", "iteration": 10, "val_loss": 2.40, "val_ppl": 11.0}
Non-finite values (the loss / grad norm of a skipped NaN step) are written as null (strict JSON).

TensorBoard also gets the run config once per (re)start: the flattened config as a markdown table (text tag
"config", as Megatron logs its arguments) and as hparams (the HParams dashboard, with train/loss and valid/val_loss
as its metrics), written into the run's own event files (SummaryWriter.add_hparams would start a separate run).

W&B (see :func:`wandb_init_kwargs`): a config field that is set wins; an unset one falls back to the W&B environment
variable (WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_RUN_GROUP, WANDB_RUN_ID), as with any wandb.init call.
The run id also falls back to one derived from SLURM_JOB_ID (stable across requeues) and the run dir, and runs
are opened with resume="allow", so the requeued parts of a SLURM job continue one W&B run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time

from megaocto.config.train import LoggingConfig


# (metric key, console label, formatter) in console order
_CONSOLE = (
    ("consumed_samples", "samples", str),
    ("loss", "loss", lambda v: f"{v:.4f}"),
    ("lr", "lr", lambda v: f"{v:.3e}"),
    ("grad_norm", "grad_norm", lambda v: f"{v:.3f}"),
    ("tokens_per_s", "tok/s", lambda v: f"{v:.0f}"),
    ("tokens_per_s_per_device", "tok/s/dev", lambda v: f"{v:.0f}"),
    ("loss_tokens_per_s", "loss tok/s", lambda v: f"{v:.0f}"),
    ("tflops_per_device", "TFLOP/s/dev", lambda v: f"{v:.4f}"),
    ("mfu", "MFU", lambda v: f"{100 * v:.2f}%"),
    ("step_time_s", "ms/step", lambda v: f"{1000 * v:.1f}"),
    ("skipped_steps", "skipped", str),
    ("eta", "ETA", str),
)


DEFAULT_WANDB_PROJECT = "megaocto"
# hparams-dashboard metrics: the scalar tags this logger writes
HPARAM_METRICS = ("train/loss", "valid/val_loss")


def flatten_config(config: dict, prefix: str = "") -> dict:
    """{"optimizer": {"lr": 1e-4}} -> {"optimizer.lr": 1e-4}; lists and tuples stay values."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def wandb_run_id(cfg: LoggingConfig, env=None) -> str | None:
    """The W&B run id: logging.wandb_id, else $WANDB_RUN_ID, else one derived from the SLURM job (same for every
    requeued part of the job: ``slurm-[<cluster>-]<job id>-<8 hex of the absolute run dir>``; the run dir keeps two
    trainings started in one allocation apart), else None (W&B makes a new id)."""
    env = os.environ if env is None else env
    if cfg.wandb_id:
        return cfg.wandb_id
    if env.get("WANDB_RUN_ID"):
        return env["WANDB_RUN_ID"]
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    cluster = re.sub(r"[^A-Za-z0-9_-]", "_", env.get("SLURM_CLUSTER_NAME", ""))
    where = hashlib.sha1(os.path.abspath(cfg.run_dir).encode()).hexdigest()[:8]
    return f"slurm-{cluster + '-' if cluster else ''}{job}-{where}"


def wandb_init_kwargs(cfg: LoggingConfig, run_config: dict | None, env=None) -> dict:
    """Arguments of ``wandb.init``. Precedence per field: the config (when set) > the WANDB_* variable (W&B reads
    WANDB_ENTITY / WANDB_NAME / WANDB_RUN_GROUP itself for fields passed as None) > the default (project
    "megaocto"; a new run id unless SLURM_JOB_ID gives one, see :func:`wandb_run_id`)."""
    env = os.environ if env is None else env
    return dict(project=cfg.wandb_project or env.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
                name=cfg.wandb_run_name, group=cfg.wandb_group, entity=cfg.wandb_entity,
                id=wandb_run_id(cfg, env), resume="allow", config=run_config or {}, dir=cfg.run_dir)


class MetricsLogger:
    """Fans one dict of scalars out to the configured sinks. Construct with enabled=False on other ranks."""

    def __init__(self, cfg: LoggingConfig, *, enabled: bool, run_config: dict | None = None, stream=None):
        self.cfg = cfg
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._jsonl = self._tb = self._wandb = None
        self._tb_hparams_end = None  # the hparams "session ended" record, written at close()
        if not enabled:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        if run_config is not None:  # the resolved config of the latest (re)start, for reproducibility
            with open(os.path.join(cfg.run_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(run_config, f, indent=2)
        if cfg.jsonl:
            self._jsonl = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(cfg.run_dir, "tensorboard"))
            if run_config is not None:
                self._tb_config(run_config)
        if cfg.wandb:
            import wandb

            kwargs = wandb_init_kwargs(cfg, run_config)
            self._wandb = wandb.init(**kwargs)
            self.info(f"W&B: project {kwargs['project']}, run id {getattr(self._wandb, 'id', kwargs['id'])} "
                      f"(resume='allow')")

    def _tb_config(self, run_config: dict) -> None:
        """The flattened run config as a text table and as hparams, in this run's own event file."""
        from torch.utils.tensorboard.summary import hparams

        flat = flatten_config(run_config)
        rows = ["| key | value |", "|---|---|"] + [f"| `{k}` | `{v!r}` |" for k, v in flat.items()]
        self._tb.add_text("config", "\n".join(rows), 0)
        # hparams take numbers, strings and bools; lists become their JSON text, unset (None) fields are left out
        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                  for k, v in flat.items() if v is not None}
        exp, ssi, self._tb_hparams_end = hparams(values, {m: 0.0 for m in HPARAM_METRICS})
        writer = self._tb.file_writer
        writer.add_summary(exp)
        writer.add_summary(ssi)
        self._tb.flush()

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def log_train(self, iteration: int, metrics: dict, *, total_iters: int | None = None) -> None:
        """Log one training step's metrics (must include 'loss')."""
        if not self.enabled:
            return
        record = {"kind": "train", "iteration": iteration, **metrics, "time": time.time()}
        parts = [f"iter {iteration}" + (f"/{total_iters}" if total_iters else "")]
        for key, label, fmt in _CONSOLE:
            if key in metrics:
                parts.append(f"{label} {fmt(metrics[key]) if metrics[key] is not None else 'n/a'}")
        for k, v in metrics.items():
            if k.startswith(("mem_", "max_rss")):  # mem_alloc_gib 1.5 -> "mem_alloc 1.50 GiB" (the unit once)
                parts.append(f"{k.removesuffix('_gib')} {v:.2f} GiB")
        self.info(" | ".join(parts))
        self._write(record, "train", iteration, metrics)

    def log_valid(self, iteration: int, val_loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(val_loss, 50.0))
        self.info(f"validation at iter {iteration} | val_loss {val_loss:.4f} | val_ppl {ppl:.3f}")
        metrics = {"val_loss": val_loss, "val_ppl": ppl}
        self._write({"kind": "valid", "iteration": iteration, **metrics, "time": time.time()}, "valid", iteration, metrics)

    def log_eval(self, iteration: int, metrics: dict, *, elapsed: float | None = None) -> None:
        """Log one in-training evaluation (e.g. HumanEvalPack ``{"<task>/<lang>/pass@<k>": value}``): a console line,
        a JSONL record of kind "eval", TensorBoard/W&B scalars in group "eval". `elapsed`: seconds it took (console
        only). Nothing is logged for empty `metrics` (ranks other than the one that scored)."""
        if not self.enabled or not metrics:
            return
        line = f"humanevalpack at iter {iteration} | " + " | ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        self.info(line + (f" | {elapsed:.1f}s" if elapsed is not None else ""))
        self._write({"kind": "eval", "iteration": iteration, **metrics, "time": time.time()}, "eval", iteration, metrics)

    def _write(self, record: dict, group: str, iteration: int, metrics: dict) -> None:
        if self._jsonl:  # strict JSON: a NaN/inf value (a skipped step's loss or grad norm) is written as null
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self._jsonl.flush()
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb:
            for k, v in numeric.items():
                self._tb.add_scalar(f"{group}/{k}", v, iteration)
            if "consumed_samples" in numeric and "loss" in numeric:
                self._tb.add_scalar("train/loss vs samples", numeric["loss"], int(numeric["consumed_samples"]))
            self._tb.flush()
        if self._wandb:
            self._wandb.log({f"{group}/{k}": v for k, v in numeric.items()}, step=iteration)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        if self._tb:
            if self._tb_hparams_end is not None:  # the hparams session ended normally
                self._tb.file_writer.add_summary(self._tb_hparams_end)
            self._tb.close()
            self._tb = None
        if self._wandb:
            self._wandb.finish()
            self._wandb = None
