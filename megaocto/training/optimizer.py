"""AdamW with Megatron-style mixed precision and one flat fp32 gradient buffer.

Every trainable parameter gets ``p.main_grad``: an fp32 view into one contiguous buffer, which is what the
data-parallel all-reduce (bucketed over the flat buffer), the sequence-parallel reduction and grad clipping
(megaocto.parallel.grads) operate on. With ``overlap_grad_reduce`` a bucket's DP all-reduce starts (async) as
soon as the last micro batch's backward has produced all its grads, overlapping communication with the rest
of the backward pass (Megatron's --overlap-grad-reduce, torch DDP's buckets).

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
    def __init__(self, model: nn.Module, cfg: OptimizerConfig, pc, *, bf16: bool, bucket_mb: float = 25.0,
                 overlap_grad_reduce: bool = False):
        self.cfg, self.pc, self.bf16 = cfg, pc, bf16
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if not bf16 and any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("fp32 training needs fp32 parameters; build the model with dtype=torch.float32")
        device = self.params[0].device
        self.grad_buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float32, device=device)
        # The flat buffer holds the params in reverse order (about the order backward produces their grads), cut
        # into buckets of whole params of >= bucket_mb, so a bucket can be all-reduced as soon as it is complete.
        bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
        self.buckets: list[tuple[int, int, int]] = []  # (start, end, number of params)
        self._bucket_of: dict[torch.Tensor, int] = {}
        offset = start = count = 0
        for p in reversed(self.params):
            p.main_grad = self.grad_buffer[offset:offset + p.numel()].view_as(p)
            self._bucket_of[p] = len(self.buckets)
            offset += p.numel()
            count += 1
            if offset - start >= bucket_numel or p is self.params[0]:
                self.buckets.append((start, offset, count))
                start, count = offset, 0
        self.overlap = overlap_grad_reduce and pc.dp > 1
        self._reduce_now = False
        self._pending: list[int] = []
        self._handles: dict[int, object] = {}
        self.overlapped_buckets = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.params]
        if bf16:
            self.masters = []
            for p in self.params:
                m = p.detach().clone().float()
                m.grad = p.main_grad
                for tag in _TAGS:
                    if hasattr(p, tag):
                        setattr(m, tag, getattr(p, tag))
                self.masters.append(m)
        else:
            self.masters = self.params
            for p in self.params:
                p.grad = p.main_grad  # autograd accumulates micro batches in place into the flat buffer
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

    def before_backward(self, last_micro_batch: bool) -> None:
        """Call before each micro batch's backward; on the last one, complete buckets start their DP all-reduce."""
        self._reduce_now = self.overlap and last_micro_batch
        if self._reduce_now:
            self._pending = [n for _, _, n in self.buckets]
            self._handles = {}
            self.overlapped_buckets = 0  # buckets launched from inside backward this step (for tests/debugging)

    def _grad_ready(self, p: torch.Tensor) -> None:
        if self.bf16:  # fold this micro batch's bf16 grad into the fp32 main grad
            p.main_grad.add_(p.grad)
            p.grad = None
        if self._reduce_now:
            b = self._bucket_of[p]
            self._pending[b] -= 1
            if self._pending[b] == 0:
                self._launch(b)
                self.overlapped_buckets += 1

    def _launch(self, b: int) -> None:
        start, end, _ = self.buckets[b]
        self._handles[b] = dist.all_reduce(self.grad_buffer[start:end], group=self.pc.dp_group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Average the main grads over the data-parallel group (waits for the overlapped bucket all-reduces)."""
        if self.pc.dp == 1:
            return
        if not self.overlap:
            for b in range(len(self.buckets)):
                self._launch(b)
        for b in range(len(self.buckets)):  # buckets whose params got no grad this step are reduced now
            if b not in self._handles:
                self._launch(b)
        for b, (start, end, _) in enumerate(self.buckets):
            self._handles[b].wait()
            self.grad_buffer[start:end].div_(self.pc.dp)
        self._handles = {}
        self._reduce_now = False

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
        """References to the live optimizer state and fp32 masters, not copies: serialise it before the next step
        (checkpoint saving is synchronous). Copying the masters cost +4 bytes/param at save time."""
        state = {"optimizer": self.optimizer.state_dict()}
        if self.bf16:
            state["fp32_from_fp16_params"] = [m.detach() for m in self.masters]
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

