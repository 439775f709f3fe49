"""The one place that decides which implementation of each fused op a model runs.

``ModelConfig.kernels`` is ``torch | triton | auto``; :func:`resolve` turns it into ``torch`` or ``triton`` for a
device and :func:`ops_for` returns a :class:`KernelOps` whose attributes the models call (``self.ops.rms_norm(...)``)
— model code holds no other kernel ifs.

Ops (every one has a plain-torch implementation, registered here; Triton implementations register themselves
from their module in this package when it is imported):

* ``layer_norm(x, weight, bias, eps)``, ``rms_norm(x, weight, eps)``: normalise the last dim, fp32 math, output
  in ``x.dtype``;
* ``bias_gelu(x, bias_or_None)``: tanh-GELU of ``x + bias``;
* ``swiglu(x)``: ``x = [gate | up]`` on the last dim -> ``silu(gate) * up``;
* ``rotary(x [b, h, s, d], cos, sin, *, interleaved)``: rotate the first ``2·cos.shape[-1]`` dims (GLM interleaved
  pairs or GPT-NeoX halves), pass the rest through;
* ``linear_cross_entropy(x [b, s, h], weight [V/tp, h], labels [b, s], pc, *, vocab_size, ignore_index=-100)``:
  fp32 per-token loss equal to ``vocab_parallel_cross_entropy(F.linear(x, weight), labels, pc, vocab_size=...)``;
* ``attention_backend``: a name passed to ``megaocto.kernels.attention.attention(..., backend=...)``, or None to let
  attention.py choose. Not a function: the Triton flash attention module registers the *name* of the attention
  backend it installed (``register("attention_backend", "triton", "triton")``).

Triton modules are imported lazily, on the first ``ops_for`` that resolves to ``triton``, from :data:`TRITON_MODULES`;
an import error in any of them propagates (a broken kernel never falls back silently). ``KernelOps.impls`` says
which implementation each op got. Importing this module never imports triton.

Rules kept here and nowhere else:

* ``auto`` = triton on CUDA when the ``triton`` package is installed (``importlib.util.find_spec``; the Triton
  modules are imported, and their errors raised, on the first such ``ops_for``), torch elsewhere (CPU runs never
  import triton for ``auto``);
* explicit ``triton`` on CPU works only under the Triton interpreter (``TRITON_INTERPRET=1`` set before any
  kernel module is imported, as tests/conftest.py does); otherwise a :class:`ConfigError` naming ``model.kernels``;
* flash-attn wins over the Triton attention: on CUDA, when ``flash_attn`` is importable, ``attention_backend`` is
  None so attention.py's priority order picks flash-attn (fp16/bf16) — or SDPA for fp32 inputs, which flash-attn
  does not take. Otherwise ``attention_backend`` is ``"triton"``; that backend itself (flash_attention.py) runs
  the ``triton_softmax`` backend for calls with ``dropout_p > 0`` (attention dropout in training).
* labels of the fused loss: :func:`check_labels` (every ``linear_cross_entropy`` implementation calls it).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from megaocto.config.base import ConfigError
from megaocto.config.model import KERNEL_IMPLS
from megaocto.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaocto.parallel.layers import check_id_range

IMPLS: tuple[str, ...] = KERNEL_IMPLS  # ("torch", "triton", "auto")
OPS: tuple[str, ...] = ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "rotary", "linear_cross_entropy",
                        "attention_backend")
# Modules of this package that register Triton implementations when imported (order does not matter).
TRITON_MODULES: tuple[str, ...] = ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "rotary", "softmax",
                                   "flash_attention", "linear_cross_entropy")

_REGISTRY: dict[tuple[str, str], Any] = {}
_triton_loaded = False
_ops_cache: dict[tuple[str, bool], "KernelOps"] = {}


@dataclass(frozen=True)
class KernelOps:
    """The implementations one model runs (see the module docstring for each op's signature)."""

    impl: str  # "torch" or "triton": what was asked for after resolving "auto"
    layer_norm: Callable
    rms_norm: Callable
    bias_gelu: Callable
    swiglu: Callable
    rotary: Callable
    linear_cross_entropy: Callable
    attention_backend: str | None
    # True when bias_gelu fuses the bias add: the producing linear layer should skip its own bias
    # (ColumnParallelLinear(skip_bias_add=True)). False keeps the torch path bit-identical to an unfused layer.
    fuse_bias: bool = False
    impls: dict[str, str] = field(default_factory=dict, compare=False)  # op -> implementation actually used


# ------------------------------------------------------------------------------------------- registration
def register(op: str, impl: str, fn: Any) -> None:
    """Register ``fn`` as implementation ``impl`` ("torch" or "triton") of ``op`` (one of :data:`OPS`)."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; ops are {OPS}")
    if impl not in ("torch", "triton"):
        raise ValueError(f"kernel implementation must be 'torch' or 'triton' (got {impl!r})")
    _REGISTRY[(op, impl)] = fn
    _ops_cache.clear()


def get(op: str, impl: str) -> Any:
    """The registered implementation ``impl`` of ``op``; KeyError when there is none.

    ``impl="triton"`` imports the Triton modules first (lazily, once).
    """
    if impl == "triton":
        _load_triton_modules()
    try:
        return _REGISTRY[(op, impl)]
    except KeyError:
        have = sorted(i for (o, i) in _REGISTRY if o == op)
        raise KeyError(f"no {impl!r} implementation of kernel op {op!r} is registered (have: {have})") from None


def _load_triton_modules() -> None:
    """Import every module of :data:`TRITON_MODULES` (each registers its Triton implementations); any import
    error propagates."""
    global _triton_loaded
    if _triton_loaded:
        return
    for name in TRITON_MODULES:
        importlib.import_module(f"{__package__}.{name}")
    _triton_loaded = True


# ------------------------------------------------------------------------------------------- resolution
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


# The values Triton itself reads as true for a boolean env knob (triton._C getenv_bool, case-insensitive).
_TRUE_ENV = ("1", "true", "on", "yes", "y")


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on: ``TRITON_INTERPRET`` is one of ``1, true, on, yes, y``
    (any case) — the rule Triton applies to the same variable. Every kernel module asks this function."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE_ENV


def resolve(impl: str, device: torch.device | str | None) -> str:
    """``"torch"`` or ``"triton"`` for config value ``impl`` on ``device`` (None = CPU).

    Raises ConfigError for an unknown value, or for ``triton`` where it cannot run (no triton package; a CPU
    device without ``TRITON_INTERPRET=1``).
    """
    if impl not in IMPLS:
        raise ConfigError(f"model.kernels must be one of {IMPLS} (got {impl!r})")
    dev = torch.device(device if device is not None else "cpu")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if dev.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ConfigError("model.kernels=triton needs the triton package (pip install triton); "
                          "set model.kernels=torch (or auto) to run without it")
    if dev.type == "cuda":
        return "triton"
    if not interpreter_enabled():
        raise ConfigError(f"model.kernels=triton runs on CUDA devices; on {dev.type} it needs the Triton "
                          f"interpreter (export TRITON_INTERPRET=1 before starting Python; tests/conftest.py does "
                          f"this). Set model.kernels=auto or torch to use the plain-torch ops on {dev.type}")
    return "triton"


def _flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def ops_for(impl: str, device: torch.device | str | None = None) -> KernelOps:
    """The :class:`KernelOps` for config value ``impl`` on ``device`` (cached; see :func:`resolve`).

    ``KernelOps.impls`` records the implementation of each op (all ``triton`` for ``impl`` resolving to triton,
    except ``attention_backend`` when flash-attn wins).
    """
    chosen = resolve(impl, device)
    dev = torch.device(device if device is not None else "cpu")
    flash_wins = chosen == "triton" and dev.type == "cuda" and _flash_attn_importable()
    key = (chosen, flash_wins)
    if key in _ops_cache:
        return _ops_cache[key]
    if chosen == "triton":
        _load_triton_modules()
    fns, impls = {}, {}
    for op in OPS:
        fns[op], impls[op] = get(op, chosen), chosen
    if flash_wins:  # the one place where flash-attn beats the Triton attention: let attention.py pick
        fns["attention_backend"], impls["attention_backend"] = None, "torch"
    ops = KernelOps(impl=chosen, fuse_bias=impls["bias_gelu"] == "triton", impls=impls, **fns)
    _ops_cache[key] = ops
    return ops


# ------------------------------------------------------------------------------------------- launcher helpers
# Shared by the Triton launchers of this package; nothing here imports triton.
def check_launch(op: str, *tensors: torch.Tensor | None) -> torch.device:
    """The device the Triton ``op`` runs on; raises when its tensors are on different devices or where Triton
    cannot run (CPU without ``TRITON_INTERPRET=1``)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"Triton {op}: all tensors must be on one device (got {sorted(map(str, devices))})")
    dev = devices.pop()
    if dev.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(f"Triton {op} got {dev.type} tensors: Triton kernels run on CUDA, or on CPU only "
                           f"under TRITON_INTERPRET=1 (set before importing megaocto.kernels); use "
                           f"model.kernels=torch (or auto) on {dev.type}")
    return dev


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def row_tiling(n_rows: int, n_cols: int, device: torch.device, *, max_tile: int = 4096) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for kernels that keep whole rows of ``n_cols`` in registers.

    BLOCK_N covers a row (power of two); BLOCK_M rows share a program while the tile stays <= ``max_tile``
    elements on CUDA. The interpreter (CPU) pays per program, not per element, so it takes up to 64K-element tiles.
    """
    block_n = next_power_of_2(n_cols)
    cap = max_tile if device.type == "cuda" else 65536
    block_m = max(1, min(next_power_of_2(n_rows), cap // block_n, 64))
    tile = block_m * block_n
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return block_m, block_n, num_warps


def elementwise_tiling(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for 2-D elementwise kernels over ``[n_rows, n_cols]``.

    CUDA: tiles of up to 4K elements, at most 1024 columns wide. Interpreter: up to 64K-element tiles (it pays per
    program, not per element).
    """
    big = device.type != "cuda"
    block_n = min(next_power_of_2(n_cols), 4096 if big else 1024)
    block_m = max(1, min(next_power_of_2(n_rows), (65536 if big else 4096) // block_n))
    return block_m, block_n, 4 if block_m * block_n <= 2048 else 8


def reduction_programs(n_rows: int, block_m: int, device: torch.device, col_blocks: int = 1) -> tuple[int, int]:
    """``(programs, rows_per_program)`` for a backward kernel that also reduces over rows (dweight, dbias).

    Each program walks ``rows_per_program`` rows (a multiple of ``block_m``) and writes one fp32 partial sum; the
    partials (``[programs, n_cols]`` fp32) are summed in torch. About 4 programs per SM on CUDA in total over the
    ``col_blocks`` column blocks of the grid; 4 row programs under the interpreter.
    """
    if device.type == "cuda":
        cap = max(1, 4 * torch.cuda.get_device_properties(device).multi_processor_count // max(col_blocks, 1))
    else:
        cap = 4
    tiles = -(-max(n_rows, 1) // block_m)
    programs = max(1, min(tiles, cap))
    rows_per_program = -(-tiles // programs) * block_m
    return -(-max(n_rows, 1) // rows_per_program), rows_per_program


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as ``[rows, last_dim]`` with a unit last-dim stride (copies only when it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ------------------------------------------------------------------------------------------- torch ops
def torch_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dim (what ``nn.LayerNorm`` computes)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x²) + eps)`` in fp32, cast back to ``x.dtype`` (ChatGLM2's RMSNorm)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(x.dtype)


def torch_bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """tanh-GELU of ``x + bias`` (``bias`` None: of ``x``)."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def torch_swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` on the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def torch_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``rot = 2·cos.shape[-1]`` dims of ``x [b, h, s, d]`` in fp32; the rest passes through.

    ``interleaved`` (GLM): pairs ``(x[2j], x[2j+1])``; else (GPT-NeoX): ``(x[j], x[j + rot/2])``. Pair ``j`` turns
    by the angle whose cosine/sine are ``cos[..., j]`` / ``sin[..., j]`` (broadcast against ``[b, h, s, rot/2]``).
    """
    rot = 2 * cos.shape[-1]
    xr, rest = x[..., :rot].float(), x[..., rot:]
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    else:
        x0, x1 = xr[..., :rot // 2], xr[..., rot // 2:]
        out = torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int, where: str) -> None:
    """Raise ValueError unless every label is ``ignore_index`` or a real token id in ``[0, vocab_size)``.

    The rule of every ``linear_cross_entropy`` implementation (torch, Triton, chunked, reference): without it an
    id such as -1 or one in the padded vocabulary gives a different meaningless loss per implementation. On CUDA
    the check is an asynchronous device assert (no host sync; a violation surfaces as a CUDA error with the
    message), elsewhere an immediate ValueError naming the offending id (``check_id_range``).
    """
    ids = torch.where(labels == ignore_index, torch.zeros((), dtype=labels.dtype, device=labels.device), labels)
    check_id_range(ids, vocab_size, ValueError,
                   f"{where}: labels must be token ids in [0, vocab_size={vocab_size}) or ignore_index="
                   f"{ignore_index}")


def torch_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pc, *,
                               vocab_size: int, ignore_index: int = -100) -> torch.Tensor:
    """``vocab_parallel_cross_entropy(F.linear(x, weight), labels, pc, vocab_size=...)`` (materialises logits);
    labels checked by :func:`check_labels`."""
    check_labels(labels, vocab_size, ignore_index, "linear_cross_entropy (torch)")
    return vocab_parallel_cross_entropy(F.linear(x, weight), labels, pc, vocab_size=vocab_size,
                                        ignore_index=ignore_index)


register("layer_norm", "torch", torch_layer_norm)
register("rms_norm", "torch", torch_rms_norm)
register("bias_gelu", "torch", torch_bias_gelu)
register("swiglu", "torch", torch_swiglu)
register("rotary", "torch", torch_rotary)
register("linear_cross_entropy", "torch", torch_linear_cross_entropy)
register("attention_backend", "torch", None)
