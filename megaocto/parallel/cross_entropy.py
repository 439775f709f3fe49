"""Cross-entropy over vocab-sharded logits without gathering them (Megatron's vocab_parallel_cross_entropy).

Forward: all-reduce MAX of the row max, then one all-reduce SUM of [target logit, Σexp (, Σlogits for label
smoothing)]. Backward: softmax − target distribution, computed locally. All math is fp32.
Label smoothing follows ``F.cross_entropy``: target = (1−ε)·onehot + ε/V over the V real classes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megaocto.parallel.context import ParallelContext


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, pc, ignore_index, smoothing, vocab_size):
        tp = pc.tp
        v_local = logits.shape[-1]
        start = pc.tp_rank * v_local
        # one contiguous fp32 copy that becomes the softmax (and, in backward, the grad) in place
        x = logits.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
        n_valid_cols = max(0, min(v_local, vocab_size - start))  # columns that are real (not padding)
        if n_valid_cols < v_local:
            x[..., n_valid_cols:] = float("-inf")
        row_max = x.max(dim=-1).values
        if tp > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=pc.tp_group)
        x.sub_(row_max.unsqueeze(-1))

        ignored = target == ignore_index
        outside = (target < start) | (target >= start + v_local) | ignored
        local_t = (target - start).masked_fill(outside, 0)
        stats = [x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)]
        if smoothing > 0:
            stats.append(x[..., :n_valid_cols].sum(-1))
        x.exp_()
        stats.append(x.sum(-1))
        stats = torch.stack(stats, dim=-1)
        if tp > 1:
            dist.all_reduce(stats, group=pc.tp_group)
        target_logit, sum_exp = stats[..., 0], stats[..., -1]
        log_z = sum_exp.log()
        loss = log_z - target_logit
        if smoothing > 0:
            mean_logit = stats[..., 1] / vocab_size
            loss = (1.0 - smoothing) * loss + smoothing * (log_z - mean_logit)
        loss = loss.masked_fill(ignored, 0.0)

        x.div_(sum_exp.unsqueeze(-1))  # softmax, saved for backward
        ctx.save_for_backward(x, local_t, outside, ignored)
        ctx.used = False
        ctx.smoothing, ctx.n_valid_cols, ctx.vocab_size, ctx.dtype = smoothing, n_valid_cols, vocab_size, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("vocab_parallel_cross_entropy reuses its saved softmax in place; "
                               "backward through it only once (no retain_graph re-use)")
        ctx.used = True
        grad, local_t, outside, ignored = ctx.saved_tensors  # the softmax, turned into the grad in place
        onehot_w = 1.0 - ctx.smoothing
        rows = grad.view(-1, grad.shape[-1])
        hit = (~outside).reshape(-1)
        idx = torch.arange(rows.shape[0], device=rows.device)[hit]
        rows[idx, local_t.reshape(-1)[hit]] -= onehot_w
        if ctx.smoothing > 0:
            grad[..., :ctx.n_valid_cols] -= ctx.smoothing / ctx.vocab_size
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, pc: "ParallelContext", *,
                                 loss_mask: torch.Tensor | None = None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, reduction: str = "none",
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token fp32 loss from local logits ``[..., V_pad/tp]`` and global targets ``[...]``.

    Positions with ``target == ignore_index`` get loss 0 and no gradient; ``loss_mask`` multiplies the loss.
    ``reduction="mean"`` gives ``Σ(loss·mask)/Σmask`` over this rank's tokens (mask = loss_mask and not
    ignored; 0 when nothing is counted), ``"sum"`` gives ``Σ(loss·mask)``. ``vocab_size`` (the real,
    unpadded vocabulary) excludes padded columns from the softmax; default: all ``V_pad`` columns count.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be none, mean or sum (got {reduction!r})")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1) (got {label_smoothing})")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: "
                         f"expected logits = target shape + [V/tp]")
    v_pad = logits.shape[-1] * pc.tp
    vocab_size = v_pad if vocab_size is None else vocab_size
    if not 0 < vocab_size <= v_pad:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {v_pad}] (the padded vocabulary)")
    target = target.long()
    loss = _VocabParallelCE.apply(logits, target, pc, ignore_index, float(label_smoothing), vocab_size)
    mask = (target != ignore_index).float()
    if loss_mask is not None:
        if loss_mask.shape != target.shape:
            raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the target shape {tuple(target.shape)}")
        mask = mask * loss_mask.float()
        loss = loss * loss_mask.float()
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1.0)
