"""Hugging Face checkpoint I/O for the converters: a lazy reader of HF model directories and a streaming, sharded
safetensors writer.

``HFSource(path)``
    Opens an HF model directory: ``config.json`` plus the weights as ``model.safetensors``,
    ``model.safetensors.index.json`` (sharded), ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` (the
    original ChatGLM2/CodeGeeX2 releases). Everything the conversion needs is checked when it opens — the config
    parses, every shard named by an index exists — before anything is written. Tensors are read lazily, one at a
    time (``get``); safetensors headers give names/shapes/dtypes without reading data, ``.bin`` files are opened
    with ``torch.load(mmap=True, weights_only=True)``.

``SafetensorsShardWriter(directory, plan, max_shard_size)``
    Streaming safetensors shards whose layout is fixed up front: ``plan`` lists every ``(name, dtype, shape)`` in
    write order; names are grouped in that order into shards of at most ``max_shard_size`` bytes (a larger tensor
    gets a shard of its own) and the shard files are named HF's way — ``model.safetensors`` when there is one, else
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` (``{"metadata": {"total_size"},
    "weight_map"}``). ``add(name, tensor)`` takes the plan's next tensor (name, dtype and shape checked) and writes
    its bytes at once, straight from the tensor's memory (the header of a shard is written when its first tensor
    arrives, from the plan); nothing is buffered, so the writer holds no tensor data at all. Each shard is fsync-ed
    when its last tensor is written. ``finish()`` checks that the whole plan arrived, writes the index and returns
    the file list; ``abort()`` closes a half-written shard. Files are plain safetensors (8-byte little-endian
    header length, JSON header with ``__metadata__`` = ``{"format": "pt"}`` and per-tensor dtype / shape /
    ``data_offsets``, padded with spaces to 8-byte alignment, then the tensors' bytes back to back in plan order),
    read by ``safetensors.safe_open`` and ``transformers``. Tensors of one dtype stay naturally aligned; mixed
    dtypes are written in plan order without alignment padding (valid safetensors).

``parse_size("5GB")`` -> bytes (HF convention: GB = 10**9, GiB = 2**30).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Sequence

import torch

from megaocto.convert.core import ConversionError, Parts, check_source_dtype

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / a byte count -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ConversionError(f"{flag}={text!r}: expected a size like 5GB, 500MB, 2GiB or a byte count")
        unit = (m.group(2) or "B").upper()
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        size = int(float(m.group(1)) * mult)
    if size < 1:
        raise ConversionError(f"{flag}={text!r} must be positive")
    return size


_HUB_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (so it can be set after import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_files_needed(files: Sequence[str]) -> list[str]:
    """The files of a hub repo (its file list) that a conversion reads: config.json, generation_config.json, the
    tokenizer files and ONE set of top-level weights — safetensors (``model.safetensors`` or its index + shards) when
    the repo has them, else ``pytorch_model*.bin`` (+ index). Subfolders (onnx/, original/...) are never fetched."""
    top = [f for f in files if "/" not in f]
    want = [f for f in top if f in (CONFIG, "generation_config.json", *TOKENIZER_FILES)]
    st = [f for f in top if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
    pt = [f for f in top if re.fullmatch(r"pytorch_model.*\.bin(\.index\.json)?", f)]
    return want + (st or pt)


def resolve_hf(hf: str, flag: str = "--hf") -> tuple[str, dict | None]:
    """``(local directory, hub info or None)`` for ``--hf``: a local directory as is; else a hub id
    ``owner/name[@revision]`` through huggingface_hub's cache (``HF_HUB_CACHE`` / ``HF_HOME``, read at call time):
    online, only :func:`hub_files_needed` are downloaded (``snapshot_download`` with those names); with
    ``HF_HUB_OFFLINE=1``, or when the hub cannot be reached, an already cached snapshot is used. Anything else is a
    one-line ConversionError saying what is missing (the network, a login for gated/private repos, the repo)."""
    if os.path.isdir(hf):
        return hf, None
    m = _HUB_ID_RE.match(hf)
    if m is None or os.path.exists(hf) or hf.startswith((".", "/", "~")):
        raise ConversionError(f"{flag}={hf}: no such directory (and not a Hugging Face hub id such as "
                              f"bigcode/starcoderbase-1b)")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, rev = m.group("repo"), m.group("rev")
    cache = os.environ.get("HF_HUB_CACHE") or None
    where = f"the Hugging Face cache{f' (HF_HUB_CACHE={cache})' if cache else ''}"
    offline = _hub_offline()
    unreachable: str | None = "HF_HUB_OFFLINE is set" if offline else None
    path = None
    try:
        if not offline:
            try:
                files = HfApi().list_repo_files(repo, revision=rev)
            except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError):
                raise
            except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as e:  # no network / hub down: try the cache
                unreachable = f"the hub cannot be reached ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            else:
                patterns = hub_files_needed(files)
                if CONFIG not in patterns:
                    raise ConversionError(f"{flag}={hf}: the hub repo has no top-level config.json (not a "
                                          f"transformers model?)")
                print(f"[from-hf] {repo}: fetching {len(patterns)} file(s) into {where} (skipped if cached): "
                      f"{', '.join(patterns[:6])}{' ...' if len(patterns) > 6 else ''}", file=sys.stderr, flush=True)
                path = snapshot_download(repo, revision=rev, cache_dir=cache, allow_patterns=patterns)
        if path is None:
            path = snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ConversionError(f"{flag}={hf}: not a local directory and not in {where}; downloading it needs the "
                              f"network ({unreachable}): run once online, or pass a local model directory") from None
    except GatedRepoError:
        raise ConversionError(f"{flag}={hf}: a gated repo: accept its licence on huggingface.co/{repo} and log in "
                              f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ConversionError(f"{flag}={hf}: no such model on the hub (or a private one: log in with "
                              f"`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ConversionError(f"{flag}={hf}: revision {rev!r} not found in {repo}") from None
    except HfHubHTTPError as e:
        raise ConversionError(f"{flag}={hf}: the hub refused the download ({str(e).splitlines()[0][:200]})") from None
    if not any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_FILES) or not os.path.isfile(
            os.path.join(path, CONFIG)):
        raise ConversionError(f"{flag}={hf}: the cached snapshot {path} lacks config.json or weights (a partial "
                              f"download?); run once online to complete it")
    return path, {"hub_id": repo, "revision": rev or "main", "commit": os.path.basename(os.path.normpath(path))}


class HFSource:
    """A Hugging Face model directory read lazily; see the module docstring."""

    def __init__(self, path: str, flag: str = "--hf"):
        self.path = path
        if not os.path.isdir(path):
            raise ConversionError(f"{flag}={path}: no such directory")
        cfg_path = os.path.join(path, CONFIG)
        if not os.path.isfile(cfg_path):
            raise ConversionError(f"{cfg_path}: missing (an HF model directory needs config.json)")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                self.config: dict = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}:{e.lineno}: invalid JSON: {e.msg}") from None
        self.config_path = cfg_path
        self._file_of: dict[str, str] = {}  # tensor name -> file path
        self._handles: dict[str, object] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        found = next((n for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)
        if found is None:
            raise ConversionError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
        self.weights_file = os.path.join(path, found)
        if found.endswith(".index.json"):
            try:
                with open(self.weights_file, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{self.weights_file}: not a valid weights index ({e})") from None
            for name, fname in weight_map.items():
                self._file_of[name] = os.path.join(path, fname)
            missing = sorted({f for f in self._file_of.values() if not os.path.isfile(f)})
            if missing:
                raise ConversionError(f"{self.weights_file} names shard(s) that are missing: "
                                      f"{', '.join(os.path.basename(m) for m in missing[:5])}")
        else:
            for name in self._open(self.weights_file).keys():  # type: ignore[attr-defined]
                self._file_of[name] = self.weights_file
        self.is_safetensors = self.weights_file.endswith((".safetensors", ".safetensors.index.json"))

    # ------------------------------------------------------------------ lazy access
    def _open(self, file: str):
        h = self._handles.get(file)
        if h is None:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                try:
                    h = safe_open(file, framework="pt", device="cpu")
                except Exception as e:  # noqa: BLE001 - name the broken file
                    raise ConversionError(f"{file}: cannot open safetensors file ({e})") from None
            else:
                try:
                    h = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:  # noqa: BLE001
                    raise ConversionError(f"{file}: cannot read torch weights ({type(e).__name__}: {e})") from None
                if not isinstance(h, dict):
                    raise ConversionError(f"{file}: expected a state dict, got {type(h).__name__}")
            self._handles[file] = h
        return h

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) without reading the data (safetensors headers; mmap-ed .bin)."""
        if name not in self._meta:
            file = self._require(name)
            h = self._open(file)
            if file.endswith(".safetensors"):
                sl = h.get_slice(name)
                code = sl.get_dtype()
                if code not in _ST_DTYPES:
                    raise ConversionError(f"{file}: tensor {name!r} has dtype {code}, which is not supported "
                                          f"(only F32, BF16, F16 weights; dequantise the checkpoint first)")
                self._meta[name] = (tuple(sl.get_shape()), _ST_DTYPES[code])
            else:
                t = h[name]
                self._meta[name] = (tuple(t.shape), t.dtype)
        return self._meta[name]

    def _require(self, name: str) -> str:
        if name not in self._file_of:
            raise ConversionError(f"{self.weights_file}: tensor {name!r} missing (config.json and the weights "
                                  f"disagree, or this is another architecture)")
        return self._file_of[name]

    def get(self, name: str) -> torch.Tensor:
        file = self._require(name)
        h = self._open(file)
        return h.get_tensor(name) if file.endswith(".safetensors") else h[name]

    def check(self, expected: list[str], ignorable: set[str] | None = None, where: str = "") -> None:
        """Every expected name present with a supported dtype; no unknown names besides ``ignorable``."""
        missing = [n for n in expected if n not in self._file_of]
        if missing:
            raise ConversionError(f"{self.weights_file}: {len(missing)} tensor(s) missing for {where}, e.g. "
                                  f"{missing[:4]}")
        extra = sorted(set(self._file_of) - set(expected) - (ignorable or set()))
        if extra:
            raise ConversionError(f"{self.weights_file}: {len(extra)} unexpected tensor(s) for {where}, e.g. "
                                  f"{extra[:4]} (is config.json the right architecture?)")
        for n in expected:
            check_source_dtype(self.info(n)[1], f"{self._file_of[n]}: {n}")

    def close(self) -> None:
        self._handles.clear()


_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
WRITE_CHUNK = 4 << 20  # bytes per write() call of SafetensorsShardWriter.add


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(plan: Sequence[tuple[str, torch.dtype, Sequence[int]]], max_shard_size: int
                ) -> list[list[tuple[str, torch.dtype, tuple[int, ...], int]]]:
    """Group ``(name, dtype, shape)`` in order into shards of at most ``max_shard_size`` bytes (a tensor larger than
    the cap gets a shard of its own); returns per shard ``[(name, dtype, shape, nbytes), ...]``."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
    size = 0
    seen: set[str] = set()
    for name, dtype, shape in plan:
        if name in seen:
            raise ConversionError(f"safetensors plan: tensor {name!r} appears twice")
        seen.add(name)
        if dtype not in _ST_CODES:
            raise ConversionError(f"safetensors plan: {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, tuple(int(s) for s in shape), nbytes))
        size += nbytes
    return shards


def safetensors_header(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...], int]],
                       metadata: dict[str, str] | None) -> bytes:
    """The first bytes of a safetensors file holding ``entries`` in this order: the 8-byte little-endian header
    length, then the JSON header (``__metadata__`` first, then each tensor's dtype/shape/data_offsets relative to
    the data section), padded with spaces so the data section starts at a multiple of 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A read-only, zero-copy byte view of a CPU tensor's data (a copy only if ``t`` is not contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_bytes_2d(t: torch.Tensor):
    """A zero-copy ``[rows, row_bytes]`` uint8 numpy view of a 2-D CPU tensor whose rows are each contiguous (e.g. a
    column slice of a contiguous matrix); a copy only when they are not."""
    t = t.detach()
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.view(torch.uint8).numpy()


def _writev_all(fd: int, buffers: list) -> None:
    """``os.writev`` until every byte of ``buffers`` is written (a call may write fewer bytes than asked)."""
    views = [memoryview(b).cast("B") for b in buffers]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + 1024])
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


class SafetensorsShardWriter:
    """Streaming, size-capped safetensors shards in HF naming, planned up front; see the module docstring."""

    def __init__(self, directory: str, plan: Sequence[tuple[str, torch.dtype, Sequence[int]]], max_shard_size: int,
                 metadata: dict[str, str] | None = None):
        self.directory = directory
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(plan, max_shard_size)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors"
                                                              for i in range(1, n + 1)]
        self.total_size = sum(e[3] for shard in self.shards for e in shard)
        self._shard, self._pos = 0, 0  # next tensor: self.shards[self._shard][self._pos]
        self._file = None
        self._done = False

    def _open_shard(self) -> None:
        path = os.path.join(self.directory, self.files[self._shard])
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # closed in _close_shard / abort
        _writev_all(self._file, [safetensors_header(self.shards[self._shard], self.metadata)])

    def _close_shard(self) -> None:
        fd, self._file = self._file, None
        assert fd is not None
        try:
            os.fsync(fd)  # durable before the directory is renamed into place
        finally:
            os.close(fd)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s bytes now; it must be the next tensor of the plan, with the planned dtype and shape."""
        if self._shard >= len(self.shards) or not self.shards[self._shard]:
            raise ConversionError(f"safetensors writer: tensor {name!r} is not in the plan (all planned tensors "
                                  f"were already written)")
        want, dtype, shape, _ = self.shards[self._shard][self._pos]
        if name != want:
            raise ConversionError(f"safetensors writer: got tensor {name!r} but the plan expects {want!r} next")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ConversionError(f"safetensors writer: {name}: {tensor.dtype} {tuple(tensor.shape)} does not match "
                                  f"the planned {dtype} {shape}")
        if self._file is None:
            self._open_shard()
        if isinstance(tensor, Parts) and tensor.dim == 1:
            self._write_interleaved(tensor)
        else:
            for part in (tensor.parts if isinstance(tensor, Parts) else (tensor,)):
                data = tensor_bytes(part)
                # Bounded write() calls: one syscall per multi-hundred-MB tensor cost 20-40% more kernel time per
                # byte here than 4 MiB pieces (1B to-hf benchmark, 4 of 4 alternating pairs; RESULTS_convert.md).
                for start in range(0, len(data), WRITE_CHUNK):
                    _writev_all(self._file, [data[start:start + WRITE_CHUNK]])
        self._pos += 1
        if self._pos == len(self.shards[self._shard]):
            self._close_shard()
            self._shard, self._pos = self._shard + 1, 0

    def _write_interleaved(self, t: Parts) -> None:
        """A dim-1 :class:`Parts` (column blocks, e.g. the TP shards of a row-parallel weight): each output row is
        the rows of the parts side by side, written straight from the parts' memory with ``os.writev`` (no merged
        copy), up to 1024 row pieces per call."""
        import numpy as np

        rows = [np.asarray(tensor_bytes_2d(p)) for p in t.parts]
        iov: list = []
        for r in range(t.shape[0]):
            iov.extend(a[r] for a in rows)
            if len(iov) >= 1024:
                _writev_all(self._file, iov)
                iov = []
        if iov:
            _writev_all(self._file, iov)

    def finish(self) -> list[str]:
        """Check every planned tensor was written, write the index (more than one shard); return the file names."""
        if self._shard == 0 and not self.shards[0]:  # empty plan: one valid, empty file
            self._open_shard()
            self._close_shard()
            self._shard = 1
        if self._shard < len(self.shards):
            missing = self.shards[self._shard][self._pos][0]
            raise ConversionError(f"safetensors writer: finished before tensor {missing!r} was written")
        files = list(self.files)
        if len(self.files) > 1:
            weight_map = {e[0]: fname for fname, shard in zip(self.files, self.shards) for e in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
            files.append("model.safetensors.index.json")
        self._done = True
        return files

    def abort(self) -> None:
        """Close an unfinished shard file (the caller removes the directory)."""
        if self._file is not None:
            os.close(self._file)
            self._file = None


def tokenizer_files(path: str, flag: str = "--tokenizer") -> list[str]:
    """The tokenizer files to copy from ``path`` (a directory or a single tokenizer.json / .model file)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConversionError(f"{flag}={path}: no such file or directory")
    files = [os.path.join(path, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
    files += [os.path.join(path, n) for n in sorted(os.listdir(path))
              if n.endswith(".model") and os.path.join(path, n) not in files]
    if not any(os.path.basename(f) in ("tokenizer.json", "tokenizer.model") or f.endswith(".model") for f in files):
        raise ConversionError(f"{flag}={path}: no tokenizer.json or *.model in this directory")
    return files


def special_tokens(tokenizer_json: str) -> tuple[dict, dict[str, int]]:
    """``(special_tokens_map, token_ids)`` of a ``tokenizer.json`` as megaocto uses it
    (:func:`megaocto.data.tokenizer.load_tokenizer`): ``eos_token`` = the EOD token (StarCoder's ``<|endoftext|>``),
    ``bos_token`` (StarCoder: ``<|endoftext|>`` too), ``pad_token`` (``<fim_pad>`` when present, else EOD),
    ``unk_token`` (the BPE model's own unk token, else EOD, as StarCoder's tokenizer files say) and
    ``additional_special_tokens`` (every added token marked special, in id order: StarCoder's 19).
    ``token_ids`` holds ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` for config.json."""
    from tokenizers import Tokenizer

    from megaocto.data.tokenizer import TokenizerError, load_tokenizer

    try:
        raw = Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions; name the file
        raise ConversionError(f"--tokenizer: {tokenizer_json}: cannot load ({e})") from None
    try:
        ours = load_tokenizer(tokenizer_json)
    except TokenizerError as e:  # no EOD token: export it anyway, without eos/bos/pad, and say so
        print(f"[to-hf] {e}: the exported tokenizer_config.json names no eos/bos/pad token", file=sys.stderr,
              flush=True)
        ours = None
    eos = raw.id_to_token(ours.eod) if ours is not None else None
    unk = json.loads(raw.to_str()).get("model", {}).get("unk_token") or eos
    tokens = {"bos_token": raw.id_to_token(ours.bos) if ours is not None and ours.bos is not None else None,
              "eos_token": eos, "unk_token": unk, "pad_token": raw.id_to_token(ours.pad) if ours is not None else None}
    tokens = {k: v for k, v in tokens.items() if v is not None}
    added = sorted(raw.get_added_tokens_decoder().items())
    extra = [t.content for _, t in added if t.special]
    if extra:
        tokens["additional_special_tokens"] = extra
    ids = {}
    if ours is not None:
        ids = {"eos_token_id": ours.eod, "pad_token_id": ours.pad}
        if ours.bos is not None:
            ids["bos_token_id"] = ours.bos
    return tokens, ids


def copy_tokenizer(files: list[str], directory: str, *, model_max_length: int | None = None) -> None:
    """Copy tokenizer files. With a ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    are written as transformers writes them (``tokenizer_class: PreTrainedTokenizerFast``, the special tokens of
    :func:`special_tokens`, ``model_max_length``), so ``AutoTokenizer.from_pretrained`` knows eos/bos/pad/unk;
    when those files were copied, the keys they already set are kept and only missing ones are added."""
    names = {}
    for f in files:
        name = os.path.basename(f)
        if len(files) == 1 and name.endswith(".json"):
            name = "tokenizer.json"  # a bare --tokenizer my_tok.json: HF looks for tokenizer.json
        shutil.copy2(f, os.path.join(directory, name))
        names[name] = f
    if "tokenizer.json" not in names:
        return
    tokens, _ = special_tokens(names["tokenizer.json"])
    conf_path = os.path.join(directory, "tokenizer_config.json")
    conf = _read_json(conf_path) if "tokenizer_config.json" in names else {"tokenizer_class": "PreTrainedTokenizerFast"}
    if model_max_length and "model_max_length" not in conf:
        conf["model_max_length"] = model_max_length
    conf.setdefault("clean_up_tokenization_spaces", False)
    map_path = os.path.join(directory, "special_tokens_map.json")
    smap = _read_json(map_path) if "special_tokens_map.json" in names else {}
    for key, value in tokens.items():
        have = conf.get(key) if key in conf else smap.get(key)
        if have is None or have == []:
            conf[key] = value
            smap[key] = value
        else:
            conf.setdefault(key, have)
            smap.setdefault(key, have)
    for path, obj in ((conf_path, conf), (map_path, smap)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)  # \u escapes: valid JSON, never a lone-surrogate UnicodeEncodeError
            f.write("\n")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"--tokenizer: {path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"--tokenizer: {path}: expected a JSON object")
    return obj
