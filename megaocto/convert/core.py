"""Shared machinery of the checkpoint converters: the megaocto checkpoint writer/reader, parameter specs, the streaming
torch.save writer, progress lines and logit verification.

Public API (used by hf_bigcode.py, hf_glm.py, reshard.py and megatron.py):

``param_specs(cfg, tp=1) -> dict[name, ParamSpec]``
    The megaocto parameter-name space: exactly the ``state_dict`` names of ``build_model(cfg,
    ParallelContext.single())`` (built on the meta device, so free), in that order, with the unsharded shape and
    how each name is split over TP (``partition_dim`` / ``partition_blocks``, taken from the layer tags of
    ``megaocto.parallel.layers``). ``layer_of(name)`` groups names into streaming units: ``"pre"`` (embeddings),
    ``"layers.N"``, ``"post"`` (final norm, output layer).

``write_megaocto_checkpoint(output, cfg, tensors, tp, *, dtype=None, metadata_extra=None, progress=True) -> str``
    Writes a *release* checkpoint (``{output}/latest_checkpointed_iteration.txt`` = ``release``,
    ``{output}/release/metadata.json``, ``{output}/release/mp_rank_XX/model_optim_rng.pt`` holding
    ``{"checkpoint_version": 3.0, "iteration": 0, "model": state_dict}``), the layout of
    ``megaocto.checkpoint``, so ``megaocto train --checkpoint.load OUTPUT --checkpoint.finetune true``,
    ``generation.load_checkpoint_model`` and ``torch.load(..., weights_only=True)`` read it.
    ``tensors`` is a dict or an iterable of ``(megaocto_name, UNSHARDED tensor)`` (or a :class:`Sharded`: the
    tensor as its row / column TP shards, passed to the rank files unchanged when they already are this TP's
    shards, else merged first); every name of
    ``param_specs(cfg)`` must arrive exactly once. Vocabulary tensors (``embedding.word_embeddings.weight``,
    ``output_layer.weight``) may have any number of rows >= ``cfg.vocab_size``: rows are kept when they already
    equal ``pad_vocab_size(cfg.vocab_size, tp, cfg.make_vocab_size_divisible_by)``, otherwise trimmed to
    ``vocab_size`` and zero-padded to it. ``dtype`` (torch dtype or "bf16"/"fp16"/"fp32") casts every tensor.
    ``metadata_extra`` is merged into metadata.json (e.g. ``{"converted_from": {...}}``).

    Streaming / RAM: all TP rank files are open at once as :class:`TorchStreamWriter` archives (torch.save's zip
    format, written record by record). Each incoming tensor is checked, cut into its TP shards one rank at a time
    (``shard_tensor``), each shard's bytes appended to its rank's file and dropped; only small references are
    kept until the end, when each file gets its pickled ``{"checkpoint_version", "iteration", "model"}`` record.
    Peak heap = the tensor being converted plus one shard of it (the caller's iterator decides how much it holds,
    typically one layer); each byte is written once. Tensors may arrive in any order; a per-layer progress line
    (``[convert] layers.3 (5/42) ... GB/s, ETA``) is printed on stderr when the layer changes.

    Atomicity: everything is written under ``{parent}/.{basename}.partial-{host}-{pid}/`` and renamed to ``output``
    when complete; any exception (also SIGTERM/SIGINT in the CLI) removes the partial directory, and partials of dead
    processes (SIGKILL) are removed by the next conversion into the same parent (:class:`AtomicDir`). ``output``
    must not exist (checked before writing).

``read_megaocto_checkpoint(load, *, iteration=None, trim_vocab=False) -> (cfg, iterator)``
    Reads a megaocto checkpoint saved at any TP (its metadata.json must carry ``config.model``), and yields
    ``(name, full unsharded tensor)`` in ``param_specs`` order, merging TP shards one tensor at a time from
    ``mmap``-ed rank files (``merge_shards``). ``trim_vocab=True`` cuts vocabulary rows to ``cfg.vocab_size``.
    ``checkpoint_info(load, iteration=None)`` returns ``(directory, metadata, iteration)`` without loading tensors.

Verification: ``random_batch(vocab_size, ...)`` (fixed seed), ``megaocto_logits_fn(cfg, tensors)`` (a tp=1 fp32
model filled tensor by tensor: one fp32 copy of the model), ``checkpoint_logits_fn(load)`` (a checkpoint run at the
TP it was saved at: tp gloo processes each loading its own rank file; what every ``--verify`` runs), ``max_abs_logit_diff(fn_a, fn_b, vocab_size)``,
``verify_logits(fn_a, fn_b, vocab_size, label=..., tol=None, cast=None)`` and ``verify_lazy(make_a, make_b, ...)``
(builds, runs and drops the first model before building the second, so only one model is alive at a time); both
print ``max abs logit difference (<label>): <value>``, return the value, and raise :class:`VerifyError` when it is
above the tolerance (``tol``, default :func:`default_verify_tol`).

``saved_dtype(tensors)`` / ``checkpoint_dtype(directory, meta)``: the dtype the weights are stored in.

Errors: ``ConversionError`` (a ConfigError: the CLI prints it and exits 2) names the file or field to fix;
``VerifyError`` (the CLI exits 1): the written result does not reproduce the source within the tolerance.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from megaocto.config.base import ConfigError
from megaocto.config.model import ModelConfig
from megaocto import checkpoint as ckpt
from megaocto.checkpoint.reader import checkpoint_info, config_from_metadata, saved_dtype  # noqa: F401 (API)

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                                  "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


class ConversionError(ConfigError):
    """A conversion cannot proceed; the message names the file or field to fix."""


class VerifyError(Exception):
    """``--verify``: the result's logits differ from the source's by more than the tolerance."""


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) arrived while converting; raised by the CLI's signal handler. A BaseException, like
    KeyboardInterrupt, so no ``except Exception`` on the way swallows it; :class:`AtomicDir` removes the partial
    output on the way out."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


# ------------------------------------------------------------------------------------------ dtypes
def parse_dtype(dtype: str | torch.dtype | None, where: str = "--dtype") -> torch.dtype | None:
    """``None`` / a supported torch dtype / one of ``bf16, fp16, fp32`` -> torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise ConversionError(f"{where}: unsupported dtype {dtype}; use one of bf16, fp16, fp32")
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise ConversionError(f"{where}: unsupported dtype {dtype!r}; use one of bf16, fp16, fp32")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))


def check_source_dtype(dtype: torch.dtype, where: str) -> None:
    """Refuse a source tensor dtype the converters cannot carry losslessly (e.g. int8 / fp8 quantised weights)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ConversionError(f"{where}: tensor dtype {dtype} is not supported (only float32, bfloat16, float16 "
                              f"weights; dequantise the checkpoint first)")


# ------------------------------------------------------------------------------------------ parameter specs
@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Unsharded shape (vocab rows padded for tp=1) and TP split of one megaocto parameter."""
    name: str
    shape: tuple[int, ...]
    partition_dim: int | None  # None: replicated on every TP rank
    partition_blocks: tuple[int, ...] | None
    vocab: bool  # rows are the (padded) vocabulary


_SPECS_CACHE: dict[str, dict[str, ParamSpec]] = {}


def param_specs(cfg: ModelConfig, tp: int = 1) -> dict[str, ParamSpec]:
    """Names (in ``state_dict`` order), shapes and TP layout of ``build_model(cfg, ParallelContext.single())``;
    a parameter tagged ``kv_groups`` (llama's ``key_value``) is split over ``tp`` only up to ``tp = kv_groups`` and
    replicated above it.

    Cached per (config, tp) (building even a meta-device model runs every init through torch's Python meta kernels:
    about 0.5 s for a 1B model, and a conversion asks several times)."""
    key = json.dumps([cfg.to_dict(), tp], sort_keys=True, default=str)
    if key not in _SPECS_CACHE:
        _SPECS_CACHE[key] = _build_param_specs(cfg, tp)
    return dict(_SPECS_CACHE[key])


def _build_param_specs(cfg: ModelConfig, tp: int) -> dict[str, ParamSpec]:
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    cfg.validate(1)
    model = build_model(cfg, ParallelContext.single(), device="meta")
    specs = {}
    for name, t in model.state_dict(keep_vars=True).items():
        tp_split = bool(getattr(t, "tensor_parallel", False)) and tp <= getattr(t, "kv_groups", tp)
        specs[name] = ParamSpec(name, tuple(t.shape), t.partition_dim if tp_split else None,
                                getattr(t, "partition_blocks", None) if tp_split else None, name in VOCAB_PARAMS)
    return specs


def layer_of(name: str) -> str:
    """Streaming unit of a megaocto name: ``"pre"``, ``"layers.N"`` or ``"post"``."""
    m = _LAYER_RE.match(name)
    if m:
        return f"layers.{m.group(1)}"
    return "pre" if name.startswith("embedding.") else "post"


def stages_of(name: str, cfg: ModelConfig, pp: int) -> list[int]:
    """The pipeline stages whose model holds parameter ``name`` (build_model's split, even over ``pp``): a block's
    stage, the embedding on the first, final norm and output layer on the last; the tied word embedding on both."""
    from megaocto.model.common import stage_layers

    unit = layer_of(name)
    if unit.startswith("layers."):
        i = int(unit.split(".")[1])
        return [s for s in range(pp) if i in stage_layers(cfg.num_layers, pp, s)]
    if unit == "pre":
        tied_copy = cfg.tie_embeddings and name == "embedding.word_embeddings.weight" and pp > 1
        return [0, pp - 1] if tied_copy else [0]
    return [pp - 1]


def units(cfg: ModelConfig) -> list[str]:
    """Streaming units in order: pre, layers.0 .. layers.L-1, post."""
    return ["pre", *(f"layers.{i}" for i in range(cfg.num_layers)), "post"]


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    from megaocto.parallel.layers import pad_vocab_size

    return pad_vocab_size(cfg.vocab_size, tp, cfg.make_vocab_size_divisible_by)


def check_tp(cfg: ModelConfig, tp: int, where: str = "--tp") -> None:
    """ConversionError naming the field when ``tp`` cannot split the model (heads, groups, ffn)."""
    if not isinstance(tp, int) or tp < 1:
        raise ConversionError(f"{where} must be a positive integer (got {tp!r})")
    try:
        cfg.validate(tp)
    except ConfigError as e:
        raise ConversionError(f"{where}={tp}: {e}") from None


def fit_vocab_rows(t: torch.Tensor, vocab_size: int, rows: int, name: str) -> torch.Tensor:
    """``t`` with exactly ``rows`` rows: kept when it already has them, else trimmed to ``vocab_size`` and
    zero-padded (padding rows are never used by the loss or by HF exports)."""
    if t.shape[0] < vocab_size:
        raise ConversionError(f"{name}: {t.shape[0]} rows but the model's vocab_size is {vocab_size}")
    if t.shape[0] == rows:
        return t
    t = t[:vocab_size]
    if rows > vocab_size:
        t = torch.cat([t, t.new_zeros(rows - vocab_size, *t.shape[1:])])
    return t


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """One stderr line per finished unit: ``[convert] layers.3 (5/42) 1.2 GB in 3.1 s, 0.39 GB/s, ETA 25 s``."""

    def __init__(self, total: int, label: str = "convert", enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.start, self.done, self.bytes = time.monotonic(), 0, 0
        self._units: set[str] = set()

    def step(self, unit: str, nbytes: int) -> None:
        """Count ``nbytes`` for ``unit``; a line when the unit is new (units revisited out of order only add bytes)."""
        self.bytes += nbytes
        if unit in self._units:
            return
        self._units.add(unit)
        self.done += 1
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.bytes / elapsed / 1e9
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.label}] {unit} ({self.done}/{self.total}) {self.bytes / 1e9:.2f} GB in {elapsed:.1f} s, "
              f"{rate:.2f} GB/s, {self.done / elapsed:.2f} units/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ atomic output dirs
def check_output_free(output: str, flag: str = "--output") -> None:
    """Refuse an existing output path before anything is written."""
    if os.path.lexists(output):
        raise ConversionError(f"{flag}={output} already exists; remove it or choose a new directory "
                              f"(converters never overwrite)")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ConversionError(f"{flag}={output}: parent directory {parent} does not exist")


_PARTIAL_RE = re.compile(r"^\.(?P<base>.+)\.partial-(?:(?P<host>[^/]+)-)?(?P<pid>\d+)$")


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "localhost"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def remove_stale_partials(parent: str, *, log: bool = True) -> list[str]:
    """Remove the ``.{name}.partial-{host}-{pid}`` directories in ``parent`` left by converters on this host whose
    process is gone (killed with SIGKILL, or a node crash); a line on stderr names each one and its size.

    Kept: partials of live processes, partials of other hosts (a shared file system: their PIDs cannot be checked
    here). Names without a host (``.{name}.partial-{pid}``, written before host names were added) count as this
    host's. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    host = _host()
    for name in sorted(names):
        m = _PARTIAL_RE.match(name)
        path = os.path.join(parent, name)
        if not m or not os.path.isdir(path) or os.path.islink(path):
            continue
        if m.group("host") not in (None, host):
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        size = _du(path)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
            if log:
                print(f"[convert] removed stale partial output {path} ({size / 1e9:.2f} GB) of process {pid}, "
                      f"which is no longer running (a killed earlier conversion)", file=sys.stderr, flush=True)
    return removed


class AtomicDir:
    """``with AtomicDir(output) as tmp:`` write into ``tmp``; renamed to ``output`` on success, removed on error.

    ``tmp`` is ``{parent}/.{basename}.partial-{host}-{pid}``. Any exception — also :class:`Interrupted` (SIGTERM)
    and KeyboardInterrupt (SIGINT) — removes it. A SIGKILL-ed run cannot clean up: the next ``AtomicDir`` in the
    same parent directory removes such partials of dead processes (:func:`remove_stale_partials`)."""

    def __init__(self, output: str):
        self.output = os.path.abspath(output)
        parent, base = os.path.split(self.output)
        self.parent = parent
        self.tmp = os.path.join(parent, f".{base}.partial-{_host()}-{os.getpid()}")

    def __enter__(self) -> str:
        remove_stale_partials(self.parent)
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.lexists(self.output):
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ConversionError(f"{self.output} appeared while converting; the result was discarded")
        os.replace(self.tmp, self.output)
        ckpt.fsync_dir(os.path.dirname(self.output))


# ------------------------------------------------------------------------------------------ writer
def _iter_items(tensors: Iterable[tuple[str, torch.Tensor]] | dict) -> Iterator[tuple[str, torch.Tensor]]:
    return iter(tensors.items()) if isinstance(tensors, dict) else iter(tensors)


@dataclasses.dataclass(frozen=True)
class Sharded:
    """A tensor handed to :func:`write_megaocto_checkpoint` as its TP shards (rank order), each shard the ``dim``
    chunk of the full tensor (Megatron's plain row / column split). When the output has the same TP size and the
    parameter is split the same way (``partition_dim == dim``, no ``partition_blocks``; vocabulary rows already
    padded for that TP), each shard goes to its rank's file unchanged: no merge and no re-cut. Otherwise the writer
    uses :meth:`full` (one ``torch.cat``)."""
    shards: tuple[torch.Tensor, ...]
    dim: int

    def full(self) -> torch.Tensor:
        return torch.cat(self.shards, dim=self.dim) if len(self.shards) > 1 else self.shards[0]


class Parts:
    """A tensor given lazily as ``parts`` concatenated along ``dim`` (0, or 1 of a 2-D tensor), never materialised
    unless asked (:meth:`full`): what :func:`read_megaocto_checkpoint` with ``lazy=True`` yields for a TP-split
    tensor (its shards, or for fused blocks the per-rank block slices, as views of the mmap-ed rank files), so an
    exporter can write the bytes straight from the rank files (:class:`megaocto.convert.io.SafetensorsShardWriter`
    takes it) instead of copying them into a merged tensor first. Supports what the HF family mappings do to a
    tensor: ``t[:n]`` / ``t.split(sizes)`` / ``t.chunk(n)`` along dim 0, :func:`cat_rows`, ``shape``, ``dtype``, ``numel()``,
    ``element_size()``; anything else goes through :meth:`full`."""

    def __init__(self, parts: Iterable[torch.Tensor], dim: int):
        self.parts = tuple(parts)
        self.dim = dim
        first = self.parts[0]
        if dim not in (0, 1) or (dim == 1 and first.dim() != 2):
            raise ValueError(f"Parts: dim must be 0, or 1 of 2-D tensors (got dim={dim}, {first.dim()}-D)")
        shape = list(first.shape)
        shape[dim] = sum(p.shape[dim] for p in self.parts)
        self.shape = torch.Size(shape)
        self.dtype = first.dtype

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.parts[0].element_size()

    def full(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=self.dim) if len(self.parts) > 1 else self.parts[0]

    def _rows(self, start: int, stop: int) -> "Parts | torch.Tensor":
        if self.dim != 0:
            return self.full()[start:stop]
        out, pos = [], 0
        for p in self.parts:
            lo, hi = max(start - pos, 0), min(stop - pos, p.shape[0])
            if lo < hi:
                out.append(p[lo:hi])
            pos += p.shape[0]
        return Parts(out, 0) if len(out) != 1 else out[0]

    def __getitem__(self, index):
        if isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(self.shape[0])
            return self._rows(start, max(start, stop))
        return self.full()[index]

    def split(self, sizes: list[int]) -> list["Parts | torch.Tensor"]:
        out, pos = [], 0
        for n in sizes:
            out.append(self._rows(pos, pos + n))
            pos += n
        return out

    def chunk(self, chunks: int) -> list["Parts | torch.Tensor"]:
        """``torch.chunk`` along dim 0 for sizes that divide evenly (fused [k, v] / [gate, up] blocks)."""
        if self.shape[0] % chunks:
            return list(self.full().chunk(chunks))
        return self.split([self.shape[0] // chunks] * chunks)


def cat_rows(items: list) -> "torch.Tensor | Parts":
    """``torch.cat(items)`` along dim 0, lazily (a :class:`Parts`) when any item is a dim-0 ``Parts``."""
    if not any(isinstance(t, Parts) for t in items):
        return torch.cat(items)
    parts: list[torch.Tensor] = []
    for t in items:
        if isinstance(t, Parts) and t.dim == 0:
            parts.extend(t.parts)
        else:
            parts.append(t.full() if isinstance(t, Parts) else t)
    return Parts(parts, 0)


def materialize(t: "torch.Tensor | Parts") -> torch.Tensor:
    """The tensor itself, or a :class:`Parts` concatenated."""
    return t.full() if isinstance(t, Parts) else t


def write_megaocto_checkpoint(output: str, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]] | dict,
                              tp: int, *, dtype: str | torch.dtype | None = None,
                              metadata_extra: dict | None = None, progress: bool = True, pp: int = 1) -> str:
    """Write a release megaocto checkpoint of ``tensors`` sharded for ``tp``; see the module docstring. With
    ``pp > 1`` the layers are split evenly over ``pp`` stages (files ``mp_rank_XX_YYY``, see :func:`stages_of`).

    Returns the absolute output path. Raises ConversionError before creating anything when ``output`` exists,
    ``tp`` does not divide the model or ``dtype`` is unsupported; a bad tensor stream (unknown / missing /
    duplicate name, wrong shape, unsupported dtype) raises during streaming and leaves no output directory.
    """
    from megaocto.parallel.layers import shard_tensor

    cast = parse_dtype(dtype)
    check_tp(cfg, tp)
    if pp > 1:
        from megaocto.model.common import stage_layers

        try:
            stage_layers(cfg.num_layers, pp, 0)
        except ConfigError as e:
            raise ConversionError(f"--pp={pp}: {e}") from None
    check_output_free(output)
    specs = param_specs(cfg, tp)
    rows = padded_vocab(cfg, tp)
    bar = Progress(len(units(cfg)), "convert", progress)
    seen: set[str] = set()
    stored_dtype: list[torch.dtype] = []

    def passed_through(name: str, t: Sharded) -> list[torch.Tensor] | None:
        """The per-rank shards of ``t`` if they are exactly this output's shards (checked like ``checked``)."""
        spec = specs.get(name)
        if (spec is None or name in seen or tp == 1 or len(t.shards) != tp or spec.partition_dim != t.dim
                or spec.partition_blocks is not None):
            return None
        want = list(spec.shape)
        if spec.vocab:
            want[0] = rows
        want[t.dim] //= tp
        if any(tuple(s.shape) != tuple(want) or s.dtype != t.shards[0].dtype for s in t.shards):
            return None
        seen.add(name)
        check_source_dtype(t.shards[0].dtype, name)
        out = [s.to(cast) if cast is not None else s for s in t.shards]
        stored_dtype.append(out[0].dtype)
        return out

    def checked(name: str, t: torch.Tensor) -> torch.Tensor:
        spec = specs.get(name)
        if spec is None:
            raise ConversionError(f"tensor {name!r} is not a parameter of this {cfg.family} model "
                                  f"(expected names like {next(iter(specs))!r})")
        if name in seen:
            raise ConversionError(f"tensor {name!r} was given twice")
        seen.add(name)
        check_source_dtype(t.dtype, name)
        if spec.vocab:
            if t.dim() != 2 or t.shape[1] != spec.shape[1]:
                raise ConversionError(f"{name}: shape {tuple(t.shape)} does not match [vocab, {spec.shape[1]}]")
            t = fit_vocab_rows(t, cfg.vocab_size, rows, name)
        elif tuple(t.shape) != spec.shape:
            raise ConversionError(f"{name}: shape {tuple(t.shape)} does not match the model's {spec.shape} "
                                  f"(check the source config against its weights)")
        if cast is not None:
            t = t.to(cast)
        stored_dtype.append(t.dtype)
        return t

    with AtomicDir(output) as tmp:
        rel = os.path.join(tmp, ckpt.iter_dir_name("release"))
        paths = []  # file index = stage * tp + tp rank
        for stage in range(pp):
            for r in range(tp):
                os.makedirs(os.path.join(rel, ckpt.rank_dir_name(r, stage, pp)))
                paths.append(os.path.join(rel, ckpt.rank_dir_name(r, stage, pp), ckpt.MODEL_FILE))
        writers = [TorchStreamWriter(p + ".part") for p in paths]
        refs: list[dict[str, TensorRef]] = [{} for _ in paths]
        current, nbytes = None, 0
        try:
            for name, t in _iter_items(tensors):
                given = passed_through(name, t) if isinstance(t, Sharded) else None
                if given is None:
                    t = checked(name, (t.full() if isinstance(t, Sharded) else t).detach())
                unit = layer_of(name)
                if unit != current:
                    if current is not None:
                        bar.step(current, nbytes)
                    current, nbytes = unit, 0
                spec = specs[name]
                for r in range(tp):  # one rank's shard at a time: written, then dropped
                    if given is not None:
                        shard = given[r]
                    elif spec.partition_dim is None or tp == 1:
                        shard = t
                    elif spec.partition_dim == 0 and spec.partition_blocks is None:
                        shard = t.chunk(tp, 0)[r]  # = shard_tensor(t, tp, r, 0), as a zero-copy row view
                    else:
                        shard = shard_tensor(t, tp, r, spec.partition_dim, spec.partition_blocks)
                    for stage in stages_of(name, cfg, pp):
                        refs[stage * tp + r][name] = writers[stage * tp + r].add(shard)
                        nbytes += shard.numel() * shard.element_size()
                    del shard
                del t, given
            if current is not None:
                bar.step(current, nbytes)
            missing = [n for n in specs if n not in seen]
            if missing:
                raise ConversionError(f"{len(missing)} parameter(s) missing from the source, e.g. {missing[:4]}; "
                                      f"the source checkpoint is incomplete or of another architecture")
            for f in range(len(paths)):
                writers[f].close({"checkpoint_version": 3.0, "iteration": 0,
                                  "model": {n: refs[f][n] for n in specs if n in refs[f]}})
                _fsync_file(paths[f] + ".part")
                os.replace(paths[f] + ".part", paths[f])
        finally:
            for w in writers:
                w.abort()
        final_dtype = stored_dtype[0] if len(set(stored_dtype)) == 1 else None
        import megaocto

        meta = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "iteration": "release", "tp": tp,
                "pp": pp, "dp": 1, "world_size": tp * pp, "time": time.time(), "torch_version": torch.__version__,
                "megaocto_version": megaocto.__version__, "reason": "converted",
                "dtype": dtype_name(final_dtype) if final_dtype is not None else "mixed",
                "config": {"model": cfg.to_dict()}, **(metadata_extra or {})}
        ckpt.write_file_atomic(os.path.join(rel, ckpt.METADATA),
                                lambda f: f.write(json.dumps(meta, indent=2).encode()))
        ckpt.write_file_atomic(os.path.join(tmp, ckpt.TRACKER), lambda f: f.write(b"release\n"))
    return os.path.abspath(output)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ streaming torch.save
_STORAGE_TYPES = {torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage", torch.float16: "HalfStorage",
                  torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
                  torch.uint8: "ByteStorage", torch.bool: "BoolStorage"}


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    type_name: str
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor whose bytes are already in a :class:`TorchStreamWriter` archive; pickles as that tensor."""
    storage: _StorageRef
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def __reduce_ex__(self, protocol):
        # what torch.Tensor pickles as for a plain CPU tensor (torch._utils._rebuild_tensor_v2)
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, torch.Size(self.shape), self.stride, False, collections.OrderedDict()))


# Why private torch APIs (torch._C.PyTorchFileWriter, torch.serialization._get_storage_alignment,
# torch._utils._rebuild_tensor_v2): the rank files must be what torch.save writes (the training loop, generation and
# Megatron tools read them with torch.load, also mmap=True and weights_only=True), and a converter must not hold a
# whole rank's state dict in RAM (14 GB for one 7B tp=1 rank) to call torch.save. The public alternatives do not
# stream: torch.save pickles the whole object at once; safetensors is another format; the stdlib zipfile cannot place
# records at torch's storage alignment (needed for mmap loading) without hand-made extra fields and always pays
# CRC32. torch.save itself writes through PyTorchFileWriter.write_record, so the records here are byte for byte
# what torch.save writes (data first). The price is a pin: TESTED_TORCH lists the versions the writer is tested with
# (tests/test_convert_reshard.py loads its files with plain torch.load(weights_only=True) and mmap=True); on any other
# version the first writer of a process writes a small file and loads it back with torch.load first, and refuses to
# go on, naming the tested versions, when that round trip fails.
TESTED_TORCH = ("2.13",)
_TORCH_WRITER_CHECKED: list[bool] = []


def _torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_stream_writer_torch(directory: str) -> None:
    """Once per process: on a torch outside :data:`TESTED_TORCH`, a round trip through :class:`TorchStreamWriter`
    and ``torch.load(weights_only=True)`` (plain and mmap) in ``directory``; ConversionError when it fails, else one
    stderr line saying the version is untested but the check passed."""
    if _TORCH_WRITER_CHECKED or _torch_minor(torch.__version__) in TESTED_TORCH:
        return
    path = os.path.join(directory, ".torch_writer_check.pt")
    sample = {"f32": torch.arange(12, dtype=torch.float32).view(3, 4)[1:], "bf16": torch.randn(5).bfloat16(),
              "f16": torch.randn(2, 2).half()}
    try:
        w = TorchStreamWriter(path, _checked=True)
        refs = {k: w.add(v) for k, v in sample.items()}
        w.close({"model": refs, "iteration": 0})
        for mmap in (False, True):
            got = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)["model"]
            if any(got[k].dtype != v.dtype or not torch.equal(got[k], v) for k, v in sample.items()):
                raise ValueError("the tensors loaded back differ from those written")
    except Exception as e:  # noqa: BLE001 - any failure means this torch's private writer API changed
        raise ConversionError(
            f"torch {torch.__version__}: megaocto's streaming checkpoint writer (torch's private "
            f"torch._C.PyTorchFileWriter; tested with torch {', '.join(TESTED_TORCH)}) does not work with this "
            f"version ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); install a "
            f"tested torch for the conversion") from None
    finally:
        if os.path.exists(path):
            os.remove(path)
    print(f"[convert] torch {torch.__version__} is not among the versions the streaming checkpoint writer is tested "
          f"with ({', '.join(TESTED_TORCH)}); its write/load self-check passed", file=sys.stderr, flush=True)
    _TORCH_WRITER_CHECKED.append(True)


class TorchStreamWriter:
    """Write a file that ``torch.load`` (also ``weights_only=True`` and ``mmap=True``) reads exactly like a
    ``torch.save``-d object, but streaming: ``add(tensor)`` appends the tensor's bytes to the archive at once and
    returns a small :class:`TensorRef`; ``close(obj)`` pickles ``obj`` (a structure holding those refs) as
    ``data.pkl``. The archive is torch.save's own zip writer (``torch._C.PyTorchFileWriter``, aligned records, no
    CRC32 as with ``torch.serialization.set_crc32_options(False)``) holding torch.save's records (``data/<key>``,
    ``data.pkl``, ``.format_version``, ``.storage_alignment``, ``byteorder``); only their order differs (data
    first), which ``torch.load`` does not depend on (it reads records by name). Heap: one tensor at a time.
    """

    def __init__(self, path: str, *, _checked: bool = False):
        import torch.serialization as ts

        if not _checked:
            check_stream_writer_torch(os.path.dirname(os.path.abspath(path)))
        self.path = path
        self._alignment = str(ts._get_storage_alignment())
        # No CRC32 (torch.serialization.set_crc32_options(False) semantics): computing it costs more than the
        # write itself here, and torch.load does not need it; --verify is the end-to-end check.
        self._zip = torch._C.PyTorchFileWriter(path, False, int(self._alignment))
        self._count = 0
        self._closed = False

    def add(self, t: torch.Tensor) -> TensorRef:
        if t.dtype not in _STORAGE_TYPES:
            raise ConversionError(f"cannot store dtype {t.dtype}")
        t = t.detach().contiguous()  # a contiguous view (e.g. a row chunk) is written in place, without a copy
        nbytes = t.numel() * t.element_size()
        key = str(self._count)
        self._count += 1
        offset = t.storage_offset() * t.element_size()
        self._zip.write_record(f"data/{key}", t.untyped_storage()[offset:offset + nbytes], nbytes)  # own bytes only
        return TensorRef(_StorageRef(key, _STORAGE_TYPES[t.dtype], t.numel()), tuple(t.shape), tuple(t.stride()))

    def close(self, obj: Any) -> None:
        import io
        import pickle

        class _Pickler(pickle.Pickler):
            def persistent_id(self, o):
                if isinstance(o, _StorageRef):
                    return ("storage", getattr(torch, o.type_name), o.key, "cpu", o.numel)
                return None

        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(".storage_alignment", self._alignment, len(self._alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._zip.write_end_of_file()
        self._closed = True
        self._zip = None

    def abort(self) -> None:
        """Drop an unfinished archive's writer (the caller removes the file)."""
        if not self._closed:
            self._zip = None
            self._closed = True


# ------------------------------------------------------------------------------------------ reader
def checkpoint_dtype(directory: str, meta: dict) -> torch.dtype:
    """The dtype of the weights stored in a megaocto checkpoint iteration directory (rank 0's file, mmap-ed: no
    tensor data is read). Training checkpoints do not record ``dtype`` in metadata.json, so the tensors decide."""
    path = os.path.join(directory, ckpt.rank_dir_name(0, 0, int(meta.get("pp", 1))), ckpt.MODEL_FILE)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - report which file is broken
        raise ConversionError(f"{path}: cannot read the model state ({type(e).__name__}: {e})") from None
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict):
        raise ConversionError(f"{path}: no 'model' state dict")
    return saved_dtype(model, DTYPES.get(str(meta.get("dtype")), torch.float32))


def read_megaocto_checkpoint(load: str, *, iteration: int | str | None = None, trim_vocab: bool = False,
                             lazy: bool = False) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """``(cfg, iterator of (name, full tensor))`` of a megaocto checkpoint at any TP; see the module docstring.

    The checks (files present, metadata valid) run before this returns; the iterator loads lazily. ``lazy=True``
    yields each TP-split tensor of a tp > 1 checkpoint as a :class:`Parts` of views of the mmap-ed rank files
    instead of merging it (no copy; the caller writes or merges it).
    """
    directory, meta, _ = checkpoint_info(load, iteration)
    cfg = config_from_metadata(meta, os.path.join(directory, ckpt.METADATA))
    tp = int(meta.get("tp", 1))
    specs = param_specs(cfg, tp)
    paths = ckpt.stage_model_files(directory, meta, 0)

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        from megaocto.parallel.layers import merge_shards

        # one state per TP rank, its pipeline stages (pp > 1) merged by name (mmap-ed: read as used)
        states = [ckpt.load_model_state(directory, meta, r) for r in range(tp)]
        for name, spec in specs.items():
            if name not in states[0]:
                raise ConversionError(f"{', '.join(paths)}: parameter {name!r} missing (config.model in metadata.json "
                                      f"does not match the saved weights)")
            if spec.partition_dim is None or tp == 1:
                t = states[0][name]
            elif lazy:
                t = _shard_parts([s[name] for s in states], spec.partition_dim, spec.partition_blocks)
            else:
                t = merge_shards([s[name] for s in states], spec.partition_dim, spec.partition_blocks)
            if spec.vocab and trim_vocab:
                t = t[:cfg.vocab_size]
            yield name, t

    return cfg, gen()


def _shard_parts(shards: list[torch.Tensor], dim: int, blocks) -> Parts:
    """The :class:`Parts` whose concatenation is ``merge_shards(shards, dim, blocks)`` (each rank's block slices in
    merge order), without copying."""
    tp = len(shards)
    local = [n // tp for n in ([shards[0].shape[dim] * tp] if blocks is None else blocks)]
    per_rank = [s.split(local, dim=dim) for s in shards]
    return Parts([per_rank[r][b] for b in range(len(local)) for r in range(tp)], dim)


def iter_units(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """Group a megaocto-ordered ``(name, tensor)`` stream into ``(unit, [(name, tensor), ...])``, one unit
    (embeddings, one layer, final) at a time."""
    unit, group = None, []
    for name, t in tensors:
        u = layer_of(name)
        if u != unit and group:
            yield unit, group
            group = []
        unit = u
        group.append((name, t))
    if group:
        yield unit, group


# ------------------------------------------------------------------------------------------ verification
def random_batch(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 1234) -> torch.Tensor:
    """The fixed random batch ``--verify`` runs (int64 ``[batch, seq]`` ids in ``[0, vocab_size)``)."""
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def megaocto_logits_fn(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]] | dict,
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ids -> fp32 logits ``[b, s, vocab_size]`` of a tp=1 fp32 megaocto model holding ``tensors``.

    Memory: the model's fp32 parameters plus one source tensor at a time (each is copied into its parameter as it
    arrives, never gathered into a second full state dict). Every parameter must arrive exactly once."""
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    with torch.random.fork_rng(devices=[]):  # the throwaway random init leaves the caller's RNG alone
        model = build_model(dataclasses.replace(cfg, attention_dropout=0.0, hidden_dropout=0.0),
                            ParallelContext.single()).eval()
    rows = padded_vocab(cfg, 1)
    own = model.state_dict(keep_vars=True)
    filled: set[str] = set()
    with torch.no_grad():
        for n, t in _iter_items(tensors):
            if n not in own or n in filled:
                raise ConversionError(f"verify: tensor {n!r} is {'duplicated' if n in filled else 'unknown'}")
            if n in VOCAB_PARAMS:
                t = fit_vocab_rows(t, cfg.vocab_size, rows, n)
            if tuple(t.shape) != tuple(own[n].shape):
                raise ConversionError(f"verify: {n} has shape {tuple(t.shape)}, the model's is {tuple(own[n].shape)}")
            own[n].copy_(t)
            filled.add(n)
            del t
    missing = [n for n in own if n not in filled]
    if missing:
        raise ConversionError(f"verify: {len(missing)} parameter(s) missing, e.g. {missing[:4]}")

    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(ids)[..., :cfg.vocab_size].float()

    return run


def _sharded_worker(rank: int, tp: int, init_file: str, load: str, iteration, ids: torch.Tensor, out: str,
                    threads: int) -> None:
    """One TP rank of :func:`checkpoint_logits_fn`: this rank's file into a model built at the checkpoint's TP."""
    import torch.distributed as dist

    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext
    from megaocto.parallel.mappings import gather_from_tp

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(tp), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=tp)
    try:
        pc = ParallelContext.init(tp=tp, backend="gloo")
        directory, meta, _ = checkpoint_info(load, iteration)
        cfg = config_from_metadata(meta, os.path.join(directory, ckpt.METADATA))
        with torch.random.fork_rng(devices=[]):
            model = build_model(dataclasses.replace(cfg, attention_dropout=0.0, hidden_dropout=0.0), pc,
                                dtype=torch.float32, device="cpu").eval()
        path = os.path.join(directory, ckpt.rank_dir_name(rank, 0, 1), ckpt.MODEL_FILE)
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["model"]
        try:
            model.load_state_dict(state, strict=True)  # copies (and casts to fp32) tensor by tensor
        except RuntimeError as e:
            raise ConversionError(f"{path}: does not fit a tp={tp} model of {directory}/metadata.json's config "
                                  f"({str(e).strip().splitlines()[0]})") from None
        del state
        with torch.no_grad():
            logits = gather_from_tp(model(ids), pc, dim=-1)[..., :cfg.vocab_size].float()
        if rank == 0:
            torch.save(logits, out)
    finally:
        dist.destroy_process_group()


def checkpoint_logits_fn(load: str, *, iteration: int | str | None = None
                         ) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``(fn, description)``: ``fn(ids)`` = fp32 logits ``[b, s, vocab_size]`` of the megaocto checkpoint in
    ``load`` run **at the TP it was saved at**: for tp > 1, tp fresh gloo processes (spawned for each call) each
    load their own rank file (no merge) into a tp-sharded model — the real vocab-parallel embedding, column/row
    parallel layers and all-reduces — and rank 0's all-gathered logits come back. tp = 1 runs in this process
    (:func:`megaocto_logits_fn`). Memory: about one fp32 model in total over the ranks. ``description`` says what
    runs (``megaocto tp=2 (2 gloo processes, one rank file each)``) for the ``--verify`` label."""
    directory, meta, it = checkpoint_info(load, iteration)
    tp = int(meta.get("tp", 1))
    if tp == 1:
        def single(ids: torch.Tensor) -> torch.Tensor:
            return megaocto_logits_fn(*read_megaocto_checkpoint(load, iteration=it))(ids)

        return single, "megaocto tp=1"

    def sharded(ids: torch.Tensor) -> torch.Tensor:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory(prefix="megaocto_verify_") as tmp:
            init_file, out = os.path.join(tmp, "store"), os.path.join(tmp, "logits.pt")
            threads = max(1, (os.cpu_count() or 1) // tp)
            ctx = mp.start_processes(_sharded_worker, args=(tp, init_file, load, it, ids, out, threads),
                                     nprocs=tp, join=False, start_method="spawn")
            try:
                while not ctx.join():
                    pass
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                last = str(e).strip().splitlines()[-1]
                raise VerifyError(f"--verify: running {load} at tp={tp} failed on a rank: {last}") from None
            finally:
                for p in ctx.processes:  # also on SIGTERM/SIGINT in this process: no orphaned ranks
                    if p.is_alive():
                        p.terminate()
                        p.join()
            return torch.load(out, weights_only=True)

    return sharded, f"megaocto tp={tp} ({tp} gloo processes, one rank file each)"


def max_abs_logit_diff(fn_a: Callable[[torch.Tensor], torch.Tensor], fn_b: Callable[[torch.Tensor], torch.Tensor],
                       vocab_size: int, *, batch: int = 2, seq: int = 16, seed: int = 1234) -> float:
    """max |fn_a(ids) - fn_b(ids)| over the first ``vocab_size`` logits of the fixed random batch."""
    seq = max(1, seq)
    ids = random_batch(vocab_size, batch, seq, seed)
    with torch.no_grad():
        a = fn_a(ids).float()[..., :vocab_size]
        b = fn_b(ids).float()[..., :vocab_size]
    if a.shape != b.shape:
        raise ConversionError(f"verify: logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())


VERIFY_TOL = 1e-3  # absolute, when the weights keep their precision
VERIFY_REL_TOL_LOWP = 5e-2  # times max |logit|, when the result is cast to bf16 / fp16


def default_verify_tol(cast: torch.dtype | None, max_abs_logit: float) -> float:
    """``--verify``'s default tolerance: :data:`VERIFY_TOL` (1e-3) when the weights are not cast to a lower
    precision, else :data:`VERIFY_REL_TOL_LOWP` (5e-2) times the largest |logit| of the source (bf16 keeps 8
    mantissa bits, ~4e-3 relative per weight, and the rounding errors of all layers add up in the logits)."""
    if cast in (torch.bfloat16, torch.float16):
        return VERIFY_REL_TOL_LOWP * max(max_abs_logit, 1e-6)
    return VERIFY_TOL


def verify_lazy(make_a: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
                make_b: Callable[[], Callable[[torch.Tensor], torch.Tensor]], vocab_size: int, *,
                label: str = "source vs result", seq: int = 16, tol: float | None = None,
                cast: torch.dtype | None = None) -> float:
    """Like :func:`verify_logits`, but builds each logits function from its maker, runs it on the fixed batch and
    drops it before building the next, so only one model is in memory at a time."""
    ids = random_batch(vocab_size, 2, max(1, seq), 1234)
    fn = make_a()
    with torch.no_grad():
        a = fn(ids).float()[..., :vocab_size]
    del fn
    fn = make_b()
    with torch.no_grad():
        b = fn(ids).float()[..., :vocab_size]
    del fn
    if a.shape != b.shape:
        raise ConversionError(f"verify: logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = float((a - b).abs().max())
    print(f"max abs logit difference ({label}): {diff:.3e}", file=sys.stdout, flush=True)
    limit = tol if tol is not None else default_verify_tol(cast, float(a.abs().max()))
    if not diff <= limit:  # also catches NaN
        raise VerifyError(f"--verify: max abs logit difference {diff:.3e} ({label}) is above the tolerance "
                          f"{limit:.3e}{'' if tol is not None else ' (the default; set --verify-tol)'}: the result "
                          f"does not reproduce the source; it was written, but do not use it before finding why")
    print(f"verify: ok (tolerance {limit:.3e})", file=sys.stdout, flush=True)
    return diff


def verify_logits(fn_a: Callable[[torch.Tensor], torch.Tensor], fn_b: Callable[[torch.Tensor], torch.Tensor],
                  vocab_size: int, *, label: str = "source vs result", seq: int = 16, tol: float | None = None,
                  cast: torch.dtype | None = None) -> float:
    """Print ``max abs logit difference (<label>): <value>`` (stdout) and return the value; :class:`VerifyError`
    when it is above ``tol`` (default: :func:`default_verify_tol` of ``cast``, the dtype the result was cast to)."""
    return verify_lazy(lambda: fn_a, lambda: fn_b, vocab_size, label=label, seq=seq, tol=tol, cast=cast)
