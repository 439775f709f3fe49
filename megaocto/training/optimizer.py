"""AdamW with Megatron-style mixed precision, one flat fp32 gradient buffer and an optional distributed optimizer.

Every trainable parameter gets ``p.main_grad``: an fp32 view into one contiguous buffer, which is what the
data-parallel reduction (bucketed over the flat buffer), the sequence-parallel reduction and grad clipping
(megaocto.parallel.grads) operate on. With ``overlap_grad_reduce`` a bucket's DP reduction starts (async) as
soon as the last micro batch's backward has produced all its grads, overlapping communication with the rest
of the backward pass (Megatron's --overlap-grad-reduce, torch DDP's buckets).

* fp32: ``p.grad`` *is* ``p.main_grad`` (autograd accumulates micro batches into it in place).
* bf16: the model holds bf16 params. A post-accumulate-grad hook adds each micro batch's bf16 grad into the
  fp32 ``main_grad`` and frees it; AdamW runs on fp32 master copies, copied back into the bf16 params.

Without ``zero1`` every DP rank all-reduces every bucket and updates every parameter (fp32: AdamW updates the
model parameters directly). With ``zero1`` (Megatron's distributed optimizer, ZeRO stage 1) each bucket is
padded to a multiple of dp and split into dp equal ranges; DP rank r owns range r of every bucket:

* grads are reduce-scattered (instead of all-reduced), so each rank holds the DP-summed grad of its ranges only;
* the fp32 masters and Adam moments exist only for the owned ranges — one 1-D "shard" per (parameter ∩ owned
  range) — so optimizer memory is divided by dp (fp32: the master shard is a view of the parameter itself);
* the grad norm is summed over the shards and over DP (and TP/PP as always);
* after the update the owned ranges of the params (which live in one flat buffer with the grad buffer's
  layout) are all-gathered over DP, bucket by bucket.

Checkpoints hold the optimizer state in one layout whatever the DP size or ``zero1`` (the full per-parameter
AdamW state of the plain optimizer, gathered onto DP rank 0 as Megatron's distributed optimizer does), so a run
can resume at another DP size, with or without ``zero1``, and the converters never see optimizer shards.

No weight decay on 1-D parameters (biases, norm weights), as in Megatron.

``optimizer.name: adafactor`` runs ``torch.optim.Adafactor`` on the same fp32 masters instead of AdamW (its
state — step, row/column factors of the second moment, or the full second moment of 1-D params — is what the
checkpoint holds then). Its factored second moment and its RMS-based step size are per whole tensor, so it is
refused with ``zero1`` and with TP shards (config validation). ``adafactor_scale_parameter=False`` gives HF
transformers' absolute step (``lr x update``, Magicoder's Trainer): each tensor is its own param group whose lr
is ``lr / max(eps2, RMS(master))`` and whose weight decay is ``weight_decay x max(eps2, RMS(master))``, set before
every step, which cancels torch's relative step size exactly while ``lr / max(eps2, RMS) <= 1/sqrt(step)``
(torch caps the relative step at ``1/sqrt(step)``; a step past that cap is counted in ``adafactor_capped_steps``).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from megaocto.config.base import ConfigError
from megaocto.config.train import OptimizerConfig

_TAGS = ("tensor_parallel", "partition_dim", "sequence_parallel", "shared")
# torch >= 2.13 renamed the tensor-in/tensor-out collectives (the old names warn); same signatures.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _copy_tags(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    for tag in _TAGS:
        if hasattr(src, tag):
            setattr(dst, tag, getattr(src, tag))
    return dst


class MixedPrecisionAdamW:
    def __init__(self, model: nn.Module, cfg: OptimizerConfig, pc, *, bf16: bool, bucket_mb: float = 25.0,
                 overlap_grad_reduce: bool = False, zero1: bool = False):
        self.cfg, self.pc, self.bf16 = cfg, pc, bf16
        self.zero1 = zero1 and pc.dp > 1
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if not bf16 and any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("fp32 training needs fp32 parameters; build the model with dtype=torch.float32")
        device = self.params[0].device
        # The flat buffer holds the params in reverse order (about the order backward produces their grads), cut
        # into buckets of whole params of >= bucket_mb, so a bucket can be reduced as soon as it is complete.
        # zero1 pads every bucket to a multiple of dp (the padding belongs to no parameter).
        bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
        align = pc.dp if self.zero1 else 1
        self.buckets: list[tuple[int, int, int]] = []  # (start, end, number of params)
        self._bucket_of: dict[torch.Tensor, int] = {}
        self._offset: dict[torch.Tensor, int] = {}
        offset = start = count = 0
        for p in reversed(self.params):
            self._offset[p] = offset
            self._bucket_of[p] = len(self.buckets)
            offset += p.numel()
            count += 1
            if offset - start >= bucket_numel or p is self.params[0]:
                offset = -(-offset // align) * align
                self.buckets.append((start, offset, count))
                start, count = offset, 0
        self.grad_buffer = torch.zeros(offset, dtype=torch.float32, device=device)
        for p in self.params:
            p.main_grad = self.grad_buffer[self._offset[p]:self._offset[p] + p.numel()].view_as(p)
        self.overlap = overlap_grad_reduce and pc.dp > 1
        self._reduce_now = False
        self._pending: list[int] = []
        self._handles: dict[int, tuple] = {}
        self.overlapped_buckets = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.params]
        if not bf16:
            for p in self.params:
                p.grad = p.main_grad  # autograd accumulates micro batches in place into the flat buffer
        if self.zero1:
            self._build_shards(device)
        elif bf16:
            self.masters = [_copy_tags(p, p.detach().clone().float()) for p in self.params]
            for p, m in zip(self.params, self.masters):
                m.grad = p.main_grad
        else:
            self.masters = self.params
        self._decays = [m.ndim >= 2 for m in self.masters] if not self.zero1 else \
            [p.ndim >= 2 for p, _, _ in self.shards]
        groups = [{"params": [m for m, d in zip(self.masters, self._decays) if d], "weight_decay": cfg.weight_decay},
                  {"params": [m for m, d in zip(self.masters, self._decays) if not d], "weight_decay": 0.0}]
        self.adafactor = getattr(cfg, "name", "adamw") == "adafactor"
        self.adafactor_capped_steps = 0
        if self.adafactor:
            if self.zero1:
                raise ValueError("optimizer.name=adafactor does not support zero1 (per-tensor statistics)")
            self._groups_used = [i for i, g in enumerate(groups) if g["params"]]
            if not cfg.adafactor_scale_parameter:  # one group per tensor: its lr and decay are rescaled every step
                groups = [{"params": [m], "weight_decay": g["weight_decay"], "base_weight_decay": g["weight_decay"]}
                          for g in groups for m in g["params"]]
            self.optimizer = torch.optim.Adafactor([g for g in groups if g["params"]], lr=cfg.lr,
                                                   beta2_decay=cfg.adafactor_beta2_decay,
                                                   eps=(cfg.adafactor_eps1, cfg.adafactor_eps2), d=cfg.adafactor_d)
            return
        impl = cfg.fused
        if impl == "auto":  # torch's fused AdamW exists for CUDA and CPU (on CPU ~10x faster than foreach)
            impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
        kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
        self._groups_used = [i for i, g in enumerate(groups) if g["params"]]
        self.optimizer = torch.optim.AdamW([groups[i] for i in self._groups_used], lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)

    # ------------------------------------------------------------------ zero1 layout
    def _owned(self, b: int) -> tuple[int, int]:
        """This DP rank's range of bucket b (zero1)."""
        start, end, _ = self.buckets[b]
        size = (end - start) // self.pc.dp
        return start + self.pc.dp_rank * size, start + (self.pc.dp_rank + 1) * size

    def _build_shards(self, device) -> None:
        """Move the params into one flat buffer (the grad buffer's layout) and make the owned master shards."""
        dtype = self.params[0].dtype
        self.param_buffer = torch.zeros(self.grad_buffer.numel(), dtype=dtype, device=device)
        for p in self.params:
            view = self.param_buffer[self._offset[p]:self._offset[p] + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
        self.shards: list[tuple[torch.Tensor, int, int]] = []  # (param, start, end) in flat buffer coordinates
        self.masters = []
        for p in reversed(self.params):  # buffer order
            lo, hi = self._owned(self._bucket_of[p])
            a, b = max(lo, self._offset[p]), min(hi, self._offset[p] + p.numel())
            if a >= b:
                continue
            piece = self.param_buffer[a:b]
            master = piece if not self.bf16 else piece.detach().clone().float()  # fp32: the param itself
            master.grad = self.grad_buffer[a:b]
            self.shards.append((p, a, b))
            self.masters.append(_copy_tags(p, master))

    def state_bytes(self) -> int:
        """Bytes of optimizer-owned state on this rank: fp32 masters that are copies, plus Adam moments."""
        total = 0
        for m, st in zip(self.masters, (self.optimizer.state.get(m, {}) for m in self.masters)):
            if self.bf16:
                total += m.numel() * m.element_size()
            total += sum(v.numel() * v.element_size() for k, v in st.items() if k != "step")
        return total

    # ------------------------------------------------------------------ grads
    def zero_grad(self) -> None:
        self.grad_buffer.zero_()
        if self.bf16:
            for p in self.params:
                p.grad = None

    def before_backward(self, last_micro_batch: bool) -> None:
        """Call before each micro batch's backward; on the last one, complete buckets start their DP reduction."""
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
        if self.zero1:  # the owner's range receives the DP sum (a separate output: collectives must not alias)
            out = torch.empty((end - start) // self.pc.dp, dtype=torch.float32, device=self.grad_buffer.device)
            work = _reduce_scatter(out, self.grad_buffer[start:end], group=self.pc.dp_group,
                                              async_op=True)
            self._handles[b] = (work, out)
        else:
            work = dist.all_reduce(self.grad_buffer[start:end], group=self.pc.dp_group, async_op=True)
            self._handles[b] = (work, None)

    def finish_grad_sync(self) -> None:
        """Average the main grads over the data-parallel group (waits for the overlapped bucket reductions).

        zero1: afterwards only this rank's owned ranges hold averaged grads (the rest is stale and unused)."""
        if self.pc.dp == 1:
            return
        for b in range(len(self.buckets)):  # without overlap, or buckets whose params got no grad this step
            if b not in self._handles:
                self._launch(b)
        for b, (start, end, _) in enumerate(self.buckets):
            work, out = self._handles[b]
            work.wait()
            if out is None:
                self.grad_buffer[start:end].div_(self.pc.dp)
            else:
                lo, hi = self._owned(b)
                self.grad_buffer[lo:hi].copy_(out).div_(self.pc.dp)
        self._handles = {}
        self._reduce_now = False

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global grad norm before clipping (over TP/PP, and over DP shards with zero1); clips when max_norm > 0."""
        from megaocto.parallel.grads import clip_grad_norm_, grad_norm

        grads_of = self.masters if self.zero1 else self.params
        if max_norm > 0:
            return clip_grad_norm_(grads_of, max_norm, self.pc, dp_sharded=self.zero1)
        return grad_norm(grads_of, self.pc, dp_sharded=self.zero1)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, lr: float) -> None:
        if self.adafactor and not self.cfg.adafactor_scale_parameter:
            self._set_absolute_adafactor_lr(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        if self.zero1:
            if self.bf16:
                for (_, a, b), m in zip(self.shards, self.masters):
                    self.param_buffer[a:b].copy_(m)
            for b in range(len(self.buckets)):
                start, end, _ = self.buckets[b]
                lo, hi = self._owned(b)
                _all_gather(self.param_buffer[start:end], self.param_buffer[lo:hi].clone(),
                                            group=self.pc.dp_group)
        elif self.bf16:
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def _set_absolute_adafactor_lr(self, lr: float) -> None:
        """torch's Adafactor steps by max(eps2, RMS(p)) x min(lr_g, 1/sqrt(t)) x update and decays by lr_g x wd_g:
        lr_g = lr / scale and wd_g = wd x scale (scale = max(eps2, RMS(p)), p before this step) give HF's
        lr x update and lr x wd."""
        groups = self.optimizer.param_groups
        masters = [g["params"][0] for g in groups]
        norms = torch.stack(torch._foreach_norm(masters)).tolist()  # one host sync for all tensors
        eps2 = self.cfg.adafactor_eps2
        for g, m, norm in zip(groups, masters, norms):
            scale = max(eps2, norm / math.sqrt(m.numel()))
            g["lr"] = lr / scale
            g["weight_decay"] = g["base_weight_decay"] * scale
        state = self.optimizer.state.get(masters[0])
        step = float(state["step"]) + 1 if state else 1.0
        if any(g["lr"] > 1 / math.sqrt(step) for g in groups):
            self.adafactor_capped_steps += 1
            if self.adafactor_capped_steps == 1:
                warnings.warn(f"adafactor_scale_parameter=false: at step {step:.0f} lr / max(eps2, RMS(param)) exceeds "
                              f"torch's cap 1/sqrt(step) for some tensor, so their step is smaller than HF's "
                              f"absolute step (counted in adafactor_capped_steps); lower optimizer.lr or raise "
                              f"optimizer.adafactor_eps2", stacklevel=2)

    # ------------------------------------------------------------------ checkpoint
    def _full_order(self) -> list[torch.Tensor]:
        """The params in the plain optimizer's state numbering (decay group, then no-decay group)."""
        decay = [p for p in self.params if p.ndim >= 2]
        return decay + [p for p in self.params if p.ndim < 2]

    def state_dict(self) -> dict | None:
        """The optimizer state in the plain (unsharded) layout.

        Without zero1: references to the live AdamW state and fp32 masters, not copies (serialise it before the
        next step; copying the masters cost +4 bytes/param at save time). With zero1 this is a collective over DP:
        DP rank 0 gets the full state assembled from every rank's shards, the other ranks None.
        """
        if not self.zero1:
            state = {"optimizer": self.optimizer.state_dict()}
            if self.bf16:
                state["fp32_from_fp16_params"] = [m.detach() for m in self.masters]
            return state
        return self._gather_full_state()

    def _gather_full_state(self) -> dict | None:
        pc, n = self.pc, self.grad_buffer.numel()
        writer = pc.dp_rank == 0
        dst = pc.dp_ranks[0] if getattr(pc, "dp_ranks", None) else 0
        started = bool(self.optimizer.state)  # no AdamW moments before the first step
        full = {}
        for key in (["exp_avg", "exp_avg_sq"] if started else []) + (["master"] if self.bf16 else []):
            local = torch.zeros(n, dtype=torch.float32, device=self.grad_buffer.device)
            for (p, a, b), m in zip(self.shards, self.masters):
                local[a:b] = m.detach() if key == "master" else self.optimizer.state[m][key]
            result = torch.empty(n, dtype=torch.float32, device=local.device) if writer else None
            for bk in range(len(self.buckets)):
                start, end, _ = self.buckets[bk]
                lo, hi = self._owned(bk)
                pieces = list(result[start:end].chunk(pc.dp)) if writer else None
                dist.gather(local[lo:hi].contiguous(), pieces, dst=dst, group=pc.dp_group)
            full[key] = result
            del local
        if not writer:
            return None
        order = self._full_order()
        index = {p: i for i, p in enumerate(order)}

        def param_view(flat, p):
            return flat[self._offset[p]:self._offset[p] + p.numel()].view_as(p).clone()

        states = {}
        if started:
            step = self.optimizer.state[self.masters[0]]["step"].clone()
            for p in order:
                states[index[p]] = {"step": step.clone(), "exp_avg": param_view(full["exp_avg"], p),
                                    "exp_avg_sq": param_view(full["exp_avg_sq"], p)}
        groups = []
        for g, which in zip(self.optimizer.state_dict()["param_groups"], self._groups_used):
            members = [index[p] for p in order if (p.ndim >= 2) == (which == 0)]
            groups.append({**g, "params": members})
        state = {"optimizer": {"state": states, "param_groups": groups}}
        if self.bf16:
            state["fp32_from_fp16_params"] = [param_view(full["master"], p) for p in self.params]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = [st for st in state["optimizer"]["state"].values()]
        saved_name = None if not saved else "adafactor" if any("row_var" in st or "variance" in st for st in saved) \
            else "adamw"
        if saved_name is not None and saved_name != ("adafactor" if self.adafactor else "adamw"):
            raise ConfigError(f"the checkpoint's optimizer state is {saved_name}'s but optimizer.name="
                             f"{'adafactor' if self.adafactor else 'adamw'}; resume with optimizer.name={saved_name}, "
                             f"or load weights only (checkpoint.finetune=true / checkpoint.no_load_optim=true)")
        if not self.zero1:
            self.optimizer.load_state_dict(state["optimizer"])
            saved = state.get("fp32_from_fp16_params")
            if saved is None:  # saved by an fp32 run: the masters are the (already loaded) model weights
                return
            if len(saved) != len(self.masters):
                raise ValueError(f"optimizer checkpoint has {len(saved)} fp32 master tensors, model has "
                                 f"{len(self.masters)}")
            for m, s in zip(self.masters, saved):
                m.copy_(s)
            if self.bf16:
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
            return
        self._load_sharded(state)

    def _load_sharded(self, state: dict) -> None:
        """Take this rank's shards out of a full (plain-layout) optimizer state."""
        opt = state["optimizer"]
        order = self._full_order()
        if opt["state"] and len(opt["state"]) != len(order):
            raise ValueError(f"optimizer checkpoint has state for {len(opt['state'])} parameters, model has "
                             f"{len(order)}")
        index = {p: i for i, p in enumerate(order)}
        saved_masters = state.get("fp32_from_fp16_params")
        if saved_masters is not None and len(saved_masters) != len(self.params):
            raise ValueError(f"optimizer checkpoint has {len(saved_masters)} fp32 master tensors, model has "
                             f"{len(self.params)}")
        position = {p: i for i, p in enumerate(self.params)}
        own_state = {}  # torch numbers the params over its groups in order
        own_index = {m: j for j, m in enumerate(m for g in self.optimizer.param_groups for m in g["params"])}
        for (p, a, b), m in zip(self.shards, self.masters):
            lo, hi = a - self._offset[p], b - self._offset[p]
            if opt["state"]:
                full = opt["state"][index[p]] if index[p] in opt["state"] else opt["state"][str(index[p])]
                own_state[own_index[m]] = {
                    "step": full["step"].clone(),
                    "exp_avg": full["exp_avg"].reshape(-1)[lo:hi].to(m.device, torch.float32).clone(),
                    "exp_avg_sq": full["exp_avg_sq"].reshape(-1)[lo:hi].to(m.device, torch.float32).clone()}
            if self.bf16:
                source = saved_masters[position[p]].reshape(-1)[lo:hi] if saved_masters is not None else \
                    self.param_buffer[a:b]  # saved by an fp32 run: the masters are the loaded weights
                m.copy_(source)
                self.param_buffer[a:b].copy_(m)
        groups = []
        for slot, g in enumerate(self.optimizer.state_dict()["param_groups"]):
            saved_g = opt["param_groups"][slot] if slot < len(opt["param_groups"]) else {}
            groups.append({**g, **{k: v for k, v in saved_g.items() if k != "params"}, "params": g["params"]})
        self.optimizer.load_state_dict({"state": own_state, "param_groups": groups})
        if self.bf16:  # every rank's params from the saved masters, not only the owned ranges
            for p in self.params:
                if saved_masters is not None:
                    p.copy_(saved_masters[position[p]])

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
