"""Learning-rate schedules (Megatron's math, stepped per optimizer step).

`lr_at(step)` takes the 1-based number of the update about to be applied, so with warmup W the first
update uses max_lr/W — never 0 (Megatron calls step(0) in its constructor, so its first update runs at
lr 0 when warmup > 0; we deliberately do not reproduce that).

At the other end the decay reaches min_lr at step decay_steps (default: the run length), as in Megatron: the last
step of a run uses min_lr, i.e. lr 0 with the default min_lr=0 (a no-op update). Intended; set min_lr > 0 or a
longer decay_iters to avoid it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megaocto.config.base import ConfigError
from megaocto.config.train import LR_STYLES, ScheduleConfig


@dataclass
class LRSchedule:
    max_lr: float
    min_lr: float
    style: str
    warmup_steps: int
    decay_steps: int

    def __post_init__(self):
        if self.style not in LR_STYLES:
            raise ConfigError(f"schedule.style must be one of {', '.join(LR_STYLES)} (got {self.style!r})")
        if self.min_lr > self.max_lr:
            raise ConfigError(f"schedule.min_lr={self.min_lr} is above optimizer.lr={self.max_lr}")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ConfigError(f"warmup steps must be >= 0 and decay steps >= 1 "
                              f"(got {self.warmup_steps}, {self.decay_steps})")

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, max_lr: float, total_steps: int) -> "LRSchedule":
        decay = cfg.decay_iters or total_steps
        warmup = cfg.warmup_iters or int(round(cfg.warmup_fraction * decay))
        return cls(max_lr=max_lr, min_lr=cfg.min_lr, style=cfg.style, warmup_steps=warmup, decay_steps=decay)

    def lr_at(self, step: int) -> float:
        """LR for the `step`-th optimizer update (1-based). A warmup longer than the decay ramps, then min_lr."""
        if step < 1:
            raise ValueError(f"optimizer steps are 1-based (got {step})")
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if self.style == "constant":
            return self.max_lr
        if self.style == "inverse_sqrt":
            return max(self.min_lr, self.max_lr * math.sqrt(max(self.warmup_steps, 1)) / math.sqrt(step))
        if step >= self.decay_steps:
            return self.min_lr
        ratio = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + (self.max_lr - self.min_lr) * coeff

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "style": self.style,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps}
