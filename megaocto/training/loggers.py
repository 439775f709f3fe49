"""Metric sinks: stdout, {run_dir}/metrics.jsonl, TensorBoard, W&B. Only the logging rank creates one.

metrics.jsonl (this module owns the format): one JSON object per line, appended across resumes:
    {"kind": "train", "iteration": 10, "consumed_samples": 80, "loss": 2.31, "lr": ..., "grad_norm": ..., ...}
    {"kind": "valid", "iteration": 10, "val_loss": 2.40, "val_ppl": 11.0}
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from megaocto.config.train import LoggingConfig


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


class MetricsLogger:
    """Fans one dict of scalars out to the configured sinks. Construct with enabled=False on other ranks."""

    def __init__(self, cfg: LoggingConfig, *, enabled: bool, run_config: dict | None = None, stream=None):
        self.cfg = cfg
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        if cfg.jsonl:
            self._jsonl = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(cfg.run_dir, "tensorboard"))
        if cfg.wandb:
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, group=cfg.wandb_group,
                                     entity=cfg.wandb_entity, config=run_config or {}, dir=cfg.run_dir)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def log_train(self, iteration: int, metrics: dict, *, total_iters: int | None = None) -> None:
        """Log one training step's metrics (must include 'loss')."""
        if not self.enabled:
            return
        record = {"kind": "train", "iteration": iteration, **metrics, "time": time.time()}
        parts = [f"iter {iteration}" + (f"/{total_iters}" if total_iters else "")]
        order = ("consumed_samples", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device",
                 "tflops_per_device", "mfu", "step_time_s", "skipped_steps", "eta")
        for k in order:
            if k in metrics:
                v = metrics[k]
                parts.append(f"{k} {(_fmt(v * 100) + '%') if k == 'mfu' and v is not None else _fmt(v)}")
        for k, v in metrics.items():
            if k.startswith(("mem_", "max_rss")):
                parts.append(f"{k} {_fmt(v)}")
        self.info(" | ".join(parts))
        self._write(record, "train", iteration, metrics)

    def log_valid(self, iteration: int, val_loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(val_loss, 50.0))
        self.info(f"validation at iter {iteration} | val_loss {_fmt(val_loss)} | val_ppl {_fmt(ppl)}")
        metrics = {"val_loss": val_loss, "val_ppl": ppl}
        self._write({"kind": "valid", "iteration": iteration, **metrics, "time": time.time()}, "valid", iteration, metrics)

    def _write(self, record: dict, group: str, iteration: int, metrics: dict) -> None:
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
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
            self._tb.close()
            self._tb = None
        if self._wandb:
            self._wandb.finish()
            self._wandb = None
