"""AdamW with Megatron-style mixed precision and one flat fp32 gradient buffer.

Every trainable parameter gets ``p.main_grad``: an fp32 view into one contiguous buffer, which is what the
data-parallel all-reduce (bucketed over the flat buffer), the sequence-parallel reduction and grad clipping
(megaocto.parallel.grads) operate on.

* fp32: ``p.grad`` *is* ``p.main_grad`` (autograd accumulates micro batches into it in place); AdamW updates
  the model parameters directly.
* bf16: the model holds bf16 params. A post-accumulate-grad hook adds each micro batch's bf16 grad into the
  fp32 ``main_grad`` and frees it; AdamW runs on fp32 master copies (whose ``.grad`` is ``main_grad``), and
  the updated masters are copied back into the bf16 params.

No weight decay on 1-D parameters (biases, norm weights), as in Megatron.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaocto.config.train import OptimizerConfig

_TAGS = ("tensor_parallel", "partition_dim", "sequence_parallel", "shared")


class MixedPrecisionAdamW:
    def __init__(self, model: nn.Module, cfg: OptimizerConfig, pc, *, bf16: bool, bucket_mb: float = 25.0):
        self.cfg, self.pc, self.bf16 = cfg, pc, bf16
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        device = self.params[0].device
        total = sum(p.numel() for p in self.params)
        self.grad_buffer = torch.zeros(total, dtype=torch.float32, device=device)
        self.bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
        self._hooks = []
        offset = 0
        for p in self.params:
            p.main_grad = self.grad_buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        if bf16:
            self.masters = []
            for p in self.params:
                m = p.detach().clone().float()
                m.grad = p.main_grad
                for tag in _TAGS:
                    if hasattr(p, tag):
                        setattr(m, tag, getattr(p, tag))
                self.masters.append(m)
                self._hooks.append(p.register_post_accumulate_grad_hook(_accumulate_into_main_grad))
        else:
            if any(p.dtype != torch.float32 for p in self.params):
                raise ValueError("fp32 training needs fp32 parameters; build the model with dtype=torch.float32")
            self.masters = self.params
            for p in self.params:
                p.grad = p.main_grad
        decay = [m for m in self.masters if m.ndim >= 2]
        no_decay = [m for m in self.masters if m.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        impl = cfg.fused
        if impl == "auto":  # torch's fused AdamW exists for CUDA and CPU (on CPU ~10x faster than foreach)
            impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
        kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)

    # ------------------------------------------------------------------ grads
    def zero_grad(self) -> None:
        self.grad_buffer.zero_()
        if self.bf16:
            for p in self.params:
                p.grad = None

    def allreduce_dp_grads(self) -> None:
        """Average main grads over the data-parallel group, one flat bucket at a time."""
        if self.pc.dp == 1:
            return
        for start in range(0, self.grad_buffer.numel(), self.bucket_numel):
            bucket = self.grad_buffer[start:start + self.bucket_numel]
            dist.all_reduce(bucket, group=self.pc.dp_group)
            bucket.div_(self.pc.dp)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.bf16:
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.bf16:
            state["fp32_from_fp16_params"] = [m.detach().clone() for m in self.masters]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        saved = state.get("fp32_from_fp16_params")
        if saved is None:  # saved by an fp32 run: the masters are the (already loaded) model weights
            return
        if len(saved) != len(self.masters):
            raise ValueError(f"optimizer checkpoint has {len(saved)} fp32 master tensors, model has {len(self.masters)}")
        for m, s in zip(self.masters, saved):
            m.copy_(s)
        if self.bf16:
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _accumulate_into_main_grad(p: torch.Tensor) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None
