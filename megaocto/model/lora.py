"""LoRA adapters on the tensor-parallel layers (``model.lora``): ``y = base(x) + (alpha / r) · B(A(dropout(x)))``.

:func:`inject_lora` freezes every base parameter (``requires_grad=False``: the optimizer then allocates no
``main_grad``, fp32 master or AdamW state for it) and adds, on each targeted host layer, a module
``<host>.lora.<target>`` with parameters ``A`` ``[r, in]`` and ``B`` ``[out, r]``, applied by a forward hook.
Initialisation follows PEFT (A Kaiming-uniform a=sqrt(5) drawn whole from the default RNG, B zero), so the step-0
model equals the base and one seed gives the same adapters at every TP size.

How the factors are laid out over TP (each keeps the LoRA path exact at any TP size, with or without sequence
parallelism; the collectives carry only r-wide activations):

* column-parallel host (weight ``[out/tp, in]``): A replicated; B sharded like the weight's output rows, block by
  block for fused projections ([q|k|v], [k|v], [gate|up]); ``h = x Aᵀ`` enters the TP region through ``copy_to_tp``
  (``gather_from_sp`` under SP), so the grad of A is the full one on every rank (partial over the sequence shards
  under SP: A is then tagged ``sequence_parallel`` and all-reduced over TP like the norms).
* row-parallel host (weight ``[out, in/tp]``): A sharded along the input dim; the partial ``h = x_local A_localᵀ``
  is all-reduced (reduce-scattered along the sequence under SP) before the replicated B, which is tagged
  ``sequence_parallel`` under SP.
* replicated host (bigcode multi-query ``key_value``, llama ``key_value`` when tp > K/V heads): A and B replicated;
  the host's output already goes through ``copy_to_tp`` in the attention; under SP both are tagged.

A target covering some fused blocks of a column-parallel host (llama ``k`` of ``key_value`` [k|v]) adds its output
into those blocks only. Targets in one shared-A group (bigcode multi-query ``query_key_value``, HF's single
``c_attn`` adapter) hold the same ``A`` parameter object.
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from megaocto.config.base import ConfigError
from megaocto.config.model import LoraConfig, lora_target_specs
from megaocto.model.common import dropout, tag_sequence_parallel
from megaocto.parallel.layers import ColumnParallelLinear, RowParallelLinear, _tag, shard_tensor
from megaocto.parallel.mappings import copy_to_tp, gather_from_sp, reduce_from_tp, reduce_scatter_to_sp


def is_lora_key(name: str) -> bool:
    """Whether a state-dict / parameter name belongs to a LoRA adapter."""
    return ".lora." in name


def _host_kind(host: nn.Module) -> str:
    if isinstance(host, ColumnParallelLinear):
        return "column"
    if isinstance(host, RowParallelLinear):
        return "row"
    return "replicated"


def _block_sizes(host: nn.Module) -> tuple[list[int], list[int]]:
    """(full, local) output block sizes of a host; replicated hosts with blocks ([k|v]) split their rows evenly."""
    if isinstance(host, ColumnParallelLinear):
        return list(host.output_sizes), list(host.local_output_sizes)
    out = host.weight.shape[0]
    blocks = 2 if hasattr(host.weight, "kv_groups") else 1  # llama's replicated key_value is [k | v]
    return [out // blocks] * blocks, [out // blocks] * blocks


class LoraAdapter(nn.Module):
    """One adapter (A, B) on one host layer; see the module docstring for the TP layout."""

    def __init__(self, host: nn.Module, cfg: LoraConfig, pc, *, blocks: tuple[int | None, int | None],
                 shared_a: nn.Parameter | None, dtype, device):
        super().__init__()
        self.pc, self.kind = pc, _host_kind(host)
        self.scale, self.p = cfg.scale, cfg.dropout
        r = cfg.rank
        full_sizes, local_sizes = _block_sizes(host)
        b0, b1 = blocks
        b0, b1 = (0 if b0 is None else b0), (len(full_sizes) if b1 is None else b1)
        self.out_slice = (sum(local_sizes[:b0]), sum(local_sizes[:b1]))
        self.local_out = sum(local_sizes)
        in_full = host.in_features if self.kind != "replicated" else host.weight.shape[1]
        kw = dict(dtype=dtype, device=device)
        if self.kind == "row" and not host.input_is_parallel:
            raise ConfigError("LoRA on a RowParallelLinear needs input_is_parallel=True")
        # A [r, in] drawn whole (same values at every TP size), sharded along the input for a row-parallel host.
        if shared_a is not None:
            self.A = shared_a
        else:
            full_a = torch.empty(r, in_full, dtype=torch.float32, device=device)
            if cfg.init == "peft":
                nn.init.kaiming_uniform_(full_a, a=math.sqrt(5))
            else:
                nn.init.normal_(full_a, std=1.0 / r)
            if self.kind == "row":
                full_a = shard_tensor(full_a, pc.tp, pc.tp_rank, 1) if pc.tp > 1 else full_a
                self.A = nn.Parameter(full_a.to(**kw))
                _tag(self.A, 1)
            else:
                self.A = nn.Parameter(full_a.to(**kw))
                tag_sequence_parallel([self.A], pc)  # column / replicated: x is a sequence shard under SP
        self.B = nn.Parameter(torch.zeros(self.out_slice[1] - self.out_slice[0], r, **kw))
        if self.kind == "column":
            _tag(self.B, 0, full_sizes[b0:b1])
        elif pc.sequence_parallel:  # row (h is a sequence shard after the reduce-scatter) and replicated hosts
            self.B.sequence_parallel = True
        if hasattr(host.weight, "kv_groups"):  # llama key_value: split up to tp = K/V heads, replicated above
            self.B.kv_groups = host.weight.kv_groups

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the host's local output slice."""
        pc = self.pc
        sharded = pc.sequence_parallel or (self.kind == "row" and pc.tp > 1)
        x = dropout(x, self.p, self.training, pc, sharded=sharded)
        h = F.linear(x, self.A)
        if pc.tp > 1 and self.kind == "column":
            h = gather_from_sp(h, pc, dim=1, grad_is_partial=True) if pc.sequence_parallel else copy_to_tp(h, pc)
        elif pc.tp > 1 and self.kind == "row":
            h = reduce_scatter_to_sp(h, pc, dim=1) if pc.sequence_parallel else reduce_from_tp(h, pc)
        return F.linear(h, self.B) * self.scale

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.A.shape[0]}, scale={self.scale}, out_slice={self.out_slice}"


def _lora_hook(host: nn.Module, args, output):
    x = args[0]
    y, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
    for adapter in host.lora.values():
        d = adapter.delta(x)
        s0, s1 = adapter.out_slice
        if (s0, s1) != (0, adapter.local_out):
            d = F.pad(d, (s0, adapter.local_out - s1))
        y = y + d.to(y.dtype)
    return y if rest is None else (y, *rest)


def inject_lora(model: nn.Module, cfg: LoraConfig, pc) -> list[str]:
    """Freeze ``model`` and add the adapters of ``cfg`` to every block; returns the adapter names
    (``layers.<i>.<host path>.lora.<target>``). No-op (empty list) when ``cfg.rank == 0``."""
    if not cfg.enabled:
        return []
    mcfg = model.cfg
    specs = lora_target_specs(cfg, mcfg.family, mcfg.is_mqa)
    model.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    added = []
    for i, block in enumerate(model.layers):
        shared: dict[str, nn.Parameter] = {}
        for target, (path, b0, b1, group) in specs.items():
            host = block.get_submodule(path)
            if not hasattr(host, "lora"):
                host.lora = nn.ModuleDict()
                host._lora_hook = host.register_forward_hook(_lora_hook)
            device = host.weight.device if host.weight.device.type != "meta" else None
            adapter = LoraAdapter(host, cfg, pc, blocks=(b0, b1), shared_a=shared.get(group) if group else None,
                                  dtype=dtype, device=device)
            if group:
                shared.setdefault(group, adapter.A)
            key = group or target  # the shared-A group's name on each of its hosts (bigcode MQA query_key_value)
            host.lora[key] = adapter
            added.append(f"layers.{i}.{path}.lora.{key}")
    if cfg.dropout > 0:  # full recompute must replay the adapters' dropout RNG as it does the model's
        base_dropout_on = model._dropout_on
        model._dropout_on = types.MethodType(lambda self: base_dropout_on() or self.training, model)
    model.lora_config = cfg
    return added


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> str:
    """A short hash of this rank's frozen base weights (names, shapes, fp64 sum and sum of squares of each), recorded
    in adapter checkpoints so that resuming onto another base is refused."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if is_lora_key(name):
            continue
        total = squares = 0.0
        for chunk in t.detach().reshape(-1).split(1 << 22):  # fp64 in chunks: no full-size copy of big tensors
            c64 = chunk.to(torch.float64)
            total += c64.sum().item()
            squares += c64.square().sum().item()
        h.update(f"{name}:{tuple(t.shape)}:{total!r}:{squares!r};".encode())
    return h.hexdigest()[:16]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' entries of ``model.state_dict()`` (this rank's shards)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the adapters: what a base checkpoint holds."""
    return {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}


@torch.no_grad()
def merge_lora_(model: nn.Module) -> None:
    """Fold every adapter into its host's weight in place (``W += scale · B A``, on this rank's shards) and remove
    the adapters: the plain model computing the same function (e.g. for generation without the LoRA path)."""
    for host in list(model.modules()):
        if not hasattr(host, "lora"):
            continue
        for adapter in host.lora.values():
            delta = (adapter.B.float() @ adapter.A.float()) * adapter.scale  # local [out slice, local in]
            s0, s1 = adapter.out_slice
            host.weight[s0:s1] += delta.to(host.weight.dtype)
        del host.lora
        host._lora_hook.remove()
        del host._lora_hook
