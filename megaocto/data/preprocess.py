"""jsonl → Megatron ``.bin/.idx``: streamed, parallel, output independent of the worker count.

Design (vs Megatron's Pool.imap + single writer, which pickles every token list back to one process):
the inputs are cut into fixed byte chunks (line-aligned by the reader, so chunking never depends on
``workers``); each worker process reads its chunk straight from the file, renders + batch-encodes the rows
single-threaded and writes its own shard ``.bin/.idx`` per output. The main process only joins the shards in
chunk order (a byte copy) as they complete, and prints progress. Memory per worker is one encode batch, so it
stays flat however large the input is. With ``join=False`` the shards are left for ``megaocto merge-datasets``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

from megaocto.config.base import ConfigError, field
from megaocto.data import indexed
from megaocto.data.formats import FormatError, get_format, output_names, render, resolve_keys
from megaocto.data.jsonl import DEFAULT_MAX_LINE_BYTES, ON_ERROR, BadRowError, JsonlReader, JsonlStats


class NothingWrittenError(ValueError):
    """Every row was skipped (or the input had no rows): no document was written. ``stats`` holds the counts."""

    def __init__(self, message: str, stats: JsonlStats):
        super().__init__(message)
        self.stats = stats


HIGH_SKIP_RATIO = 0.5  # warn when more than this fraction of the rows read was skipped


@dataclass
class PreprocessConfig:
    inputs: list = field(None, "Input .jsonl files, processed in the given order (documents keep file order).")
    output_prefix: str = field("", "Output prefix P: writes P_{key}_document.bin/.idx per output key.")
    tokenizer: str = field("", "tokenizer.json, sentencepiece .model, or a directory holding one.")
    format: str = field("text", "Row format: text, commits-pretrain, commits-finetune, commits-linediff, qa, "
                                "magicoder, instruction-response (see docs/data-preprocess.md).")
    json_key: str | list = field("text", "JSON key(s) read by the `text` format, one output per key "
                                         "(Megatron --json-keys).")
    key_map: dict = field(None, "Override the JSON key of a format role, e.g. {'question': 'prompt'}.")
    workers: int = field(1, "Worker processes (1 = in-process). Each tokenizes single-threaded.")
    on_error: str = field("fail", "Bad rows: 'fail' stops at the first with file:line: reason; 'skip' counts them.")
    append_eod: bool = field(True, "Append the tokenizer's EOD id to each document (every `text` key; only "
                                   "`targets` for input/target formats).")
    prepend_bos: bool | None = field(None, "Put the tokenizer's BOS id in front of each document (every `text` key; "
                                           "only `inputs` for input/target formats). None = the tokenizer's "
                                           "add_bos (true for Llama-family tokenizers).")
    chunk_bytes: int = field(1 << 20, "Input bytes per work unit/shard. Output does not depend on it.")
    batch_bytes: int = field(1 << 20, "Text bytes per encode_batch call inside a worker (bounds memory).")
    max_line_bytes: int = field(DEFAULT_MAX_LINE_BYTES, "Longer jsonl lines are bad rows ('oversized').")
    dtype: str = field("auto", "Token dtype: auto (uint16 if vocab < 65500 else int32), uint16 or int32.")
    join: bool = field(True, "Join shards into P_{key}_document; False leaves P_shards/ for merge-datasets.")
    log_interval: float = field(5.0, "Seconds between progress lines (0 disables).")

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("no --input files given")
        for p in self.inputs:
            if not os.path.isfile(p):
                raise ConfigError(f"input file {p} does not exist")
        if not self.output_prefix:
            raise ConfigError("--output-prefix is required")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {self.workers})")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"--on-error must be fail or skip (got {self.on_error!r})")
        if self.dtype not in ("auto", "uint16", "int32"):
            raise ConfigError(f"--dtype must be auto, uint16 or int32 (got {self.dtype!r})")
        if self.chunk_bytes < 1 or self.batch_bytes < 1:
            raise ConfigError("chunk_bytes and batch_bytes must be positive")
        try:
            get_format(self.format)
            resolve_keys(get_format(self.format), self.json_key, self.key_map)
        except ValueError as e:
            raise ConfigError(f"{e}") from None


@dataclass
class _Task:
    index: int
    path: str
    start: int
    end: int
    shard_prefix: str  # shard files: {shard_prefix}_{key}_document


@dataclass
class _ChunkResult:
    index: int
    lines: int
    stats: JsonlStats
    docs: int
    tokens: dict
    text_bytes: int
    error: BadRowError | None = None


@dataclass
class PreprocessResult:
    outputs: dict          # output key -> dataset prefix (or shard directory when join=False)
    docs: int
    tokens: dict           # output key -> tokens written (EOD included)
    stats: JsonlStats
    seconds: float
    text_bytes: int        # UTF-8 bytes of the rendered text tokenized
    input_bytes: int
    output_prefix: str | None = None

    def merge_command(self) -> str | None:
        """With join=False: the `megaocto merge-datasets` command that joins the shards into the joined outputs."""
        if self.output_prefix is None or not self.outputs:
            return None
        shard_dir = next(iter(self.outputs.values()))
        if shard_dir != self.output_prefix + "_shards":
            return None
        import shlex

        if len(self.outputs) == 1:  # one key: merge exactly that key's shards into P_{key}_document
            key = next(iter(self.outputs))
            return (f"megaocto merge-datasets --input {shlex.quote(shard_dir)} --pattern "
                    f"{shlex.quote(f'*_{key}_document.idx')} --output-prefix "
                    f"{shlex.quote(indexed.dataset_prefix(self.output_prefix, key))}")
        return (f"megaocto merge-datasets --input {shlex.quote(shard_dir)} "
                f"--output-prefix {shlex.quote(self.output_prefix)}")

    def summary(self) -> str:
        tok = sum(self.tokens.values())
        s = max(self.seconds, 1e-9)
        lines = [self.stats.summary(written=self.docs),
                 f"{self.docs} docs, {tok:,} tokens in {self.seconds:.1f} s: {self.docs / s:.1f} docs/s, "
                 f"{self.input_bytes / s / 1e6:.2f} MB/s input, {tok / s:,.0f} tokens/s"]
        lines += [f"  {k}: {v}" for k, v in self.outputs.items()]
        cmd = self.merge_command()
        if cmd:
            lines.append(f"shards left unjoined (--no-join); join them with:\n  {cmd}")
        return "\n".join(lines)


# --- worker side --------------------------------------------------------------------------------------------

_WORKER_STATE: dict = {}  # per-process cache: the tokenizer and the config (set by _init_worker)


def _init_worker(cfg: PreprocessConfig) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; scale with processes
    os.environ["RAYON_NUM_THREADS"] = "1"
    from megaocto.data.tokenizer import load_tokenizer

    _WORKER_STATE["cfg"] = cfg
    _WORKER_STATE["tok"] = load_tokenizer(cfg.tokenizer)


def _token_dtype(cfg: PreprocessConfig, vocab_size: int):
    return indexed.best_dtype(vocab_size) if cfg.dtype == "auto" else np.dtype(cfg.dtype).type


def _process_chunk(task: _Task) -> _ChunkResult:
    cfg, tok = _WORKER_STATE["cfg"], _WORKER_STATE["tok"]
    fmt = get_format(cfg.format)
    keys = resolve_keys(fmt, cfg.json_key, cfg.key_map)
    names = output_names(fmt, keys)
    dtype = _token_dtype(cfg, tok.vocab_size)
    eod = np.array([tok.eod], dtype=dtype) if cfg.append_eod else None
    add_bos = tok.add_bos if cfg.prepend_bos is None else cfg.prepend_bos
    bos = np.array([tok.bos], dtype=dtype) if add_bos else None
    # fail mode: the reader raises at the first bad row, so nothing after it is read or counted as skipped.
    reader = JsonlReader([task.path], keys, cfg.on_error, cfg.max_line_bytes, task.start, task.end)
    builders = [indexed.MMapIndexedDatasetBuilder(indexed.data_file_path(indexed.dataset_prefix(task.shard_prefix, n)),
                                                  dtype) for n in names]
    result = _ChunkResult(task.index, 0, reader.stats, 0, {n: 0 for n in names}, 0)
    batch: list[tuple[int, tuple[str, ...]]] = []
    batch_bytes = 0

    def flush():
        nonlocal batch_bytes
        if not batch:
            return
        encoded = [tok.encode_batch([texts[j] for _, texts in batch]) for j in range(len(names))]
        for i, (line, _) in enumerate(batch):
            ids = [encoded[j][i] for j in range(len(names))]
            empty = next((names[j] for j in range(len(names)) if not ids[j]), None)
            if empty is not None:
                err = BadRowError(task.path, line, f"empty {empty}", "no tokens after tokenization")
                if cfg.on_error == "fail":
                    raise err
                reader.stats.skip(err)
                reader.stats.rows_ok -= 1
                continue
            for j, b in enumerate(builders):
                arr = np.array(ids[j], dtype=dtype)
                if eod is not None and (fmt.eod_on_all or j == len(builders) - 1):
                    arr = np.concatenate([arr, eod])
                if bos is not None and (fmt.eod_on_all or j == 0):
                    arr = np.concatenate([bos, arr])
                b.add_item(arr)
                b.end_document()
                result.tokens[names[j]] += arr.size
            result.docs += 1
        batch.clear()
        batch_bytes = 0

    try:
        try:
            for row in reader:
                try:
                    texts = render(fmt, row.data, keys)
                except FormatError as e:
                    err = BadRowError(task.path, row.line, e.category, e.detail)
                    if cfg.on_error == "fail":
                        raise err from None
                    reader.stats.skip(err)
                    reader.stats.rows_ok -= 1
                    continue
                batch.append((row.line, texts))
                n = sum(len(t) for t in texts)
                batch_bytes += n
                result.text_bytes += n
                if batch_bytes >= cfg.batch_bytes:
                    flush()
            flush()
        except BadRowError as e:
            result.error = e
            reader.stats.rows_read = min(reader.stats.rows_read, e.line)  # rows up to and including the bad one
        for n, b in zip(names, builders):
            b.finalize(indexed.index_file_path(indexed.dataset_prefix(task.shard_prefix, n)))
    except BaseException:
        for b in builders:
            b.abort()
        raise
    result.lines = reader.lines_seen
    return result


# --- main side ----------------------------------------------------------------------------------------------

SHARD_DIGITS = 9  # shard names {index:09d}_{key}_document sort as text up to 10^9 shards; merge sorts numerically

def _plan(inputs: list[str], chunk_bytes: int, shard_dir: str) -> list[_Task]:
    tasks = []
    for path in inputs:
        size = os.path.getsize(path)
        for start in range(0, size, chunk_bytes):
            i = len(tasks)
            shard = os.path.join(shard_dir, f"{i:0{SHARD_DIGITS}d}")
            tasks.append(_Task(i, path, start, min(start + chunk_bytes, size), shard))
    return tasks


def _relocate(err: BadRowError, offset: int) -> BadRowError:
    return BadRowError(err.path, err.line + offset, err.category, err.detail)


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _nothing_written_message(cfg: PreprocessConfig, fmt, keys, stats: JsonlStats) -> str:
    if stats.rows_read == 0:
        return f"nothing was written: the input ({', '.join(cfg.inputs)}) has no rows"
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items()))
    return (f"nothing was written: all {stats.rows_read} rows were skipped as bad rows ({reasons}); "
            f"--format {cfg.format} reads the key(s) {', '.join(repr(k) for k in keys)} - "
            f"is this the right --format (or --keys / --json-key)?")


def preprocess(cfg: PreprocessConfig, log=None) -> PreprocessResult:
    """Tokenize ``cfg.inputs`` into ``{output_prefix}_{key}_document.bin/.idx``; see the module docstring.

    Raises BadRowError (``file:line: reason``) on the first bad row with ``on_error="fail"``; nothing is left
    at the output paths then, and the error's ``stats`` holds the counts up to that row. Raises
    NothingWrittenError (with ``stats``) when no document was written (every row skipped, or no rows); no
    outputs are left then either. Warns (``log``) when more than half of the rows were skipped.
    """
    cfg.validate()
    log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    from megaocto.data.tokenizer import load_tokenizer

    fmt = get_format(cfg.format)
    keys = resolve_keys(fmt, cfg.json_key, cfg.key_map)
    names = output_names(fmt, keys)
    tok = load_tokenizer(cfg.tokenizer)  # fail fast here, not in every worker
    if cfg.prepend_bos and tok.bos is None:
        raise ConfigError(f"prepend_bos: tokenizer {cfg.tokenizer} has no BOS token")
    dtype = _token_dtype(cfg, tok.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    shard_dir = cfg.output_prefix + "_shards"
    if os.path.exists(shard_dir):
        shutil.rmtree(shard_dir)
    os.makedirs(shard_dir)
    tasks = _plan(list(cfg.inputs), cfg.chunk_bytes, shard_dir)
    total_bytes = sum(os.path.getsize(p) for p in cfg.inputs)
    final = {n: indexed.dataset_prefix(cfg.output_prefix, n) for n in names}
    tmp = {n: p + ".tmp" for n, p in final.items()}
    builders = ({n: indexed.MMapIndexedDatasetBuilder(indexed.data_file_path(tmp[n]), dtype) for n in names}
                if cfg.join else {})
    stats, docs, tokens, text_bytes, done_bytes = JsonlStats(), 0, {n: 0 for n in names}, 0, 0
    line_base: dict[str, int] = {}
    t0 = last_log = time.perf_counter()
    pool = None
    saved_env = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    try:
        if cfg.workers == 1 or len(tasks) <= 1:
            _init_worker(cfg)
            results = map(_process_chunk, tasks)
        else:
            pool = mp.get_context("spawn").Pool(min(cfg.workers, len(tasks)), _init_worker, (cfg,))
            results = pool.imap(_process_chunk, tasks)
        for task, res in zip(tasks, results):
            base = line_base.get(task.path, 0)
            line_base[task.path] = base + res.lines
            if res.error is not None:
                res.stats.examples = [_relocate(e, base) for e in res.stats.examples]
                stats.merge(res.stats)
                err = _relocate(res.error, base)
                err.stats = stats  # rows read up to the bad row, for the summary the command prints
                raise err
            res.stats.examples = [_relocate(e, base) for e in res.stats.examples]
            stats.merge(res.stats)
            docs += res.docs
            text_bytes += res.text_bytes
            done_bytes += task.end - task.start
            for n in names:
                tokens[n] += res.tokens[n]
                if cfg.join:
                    shard = indexed.dataset_prefix(task.shard_prefix, n)
                    builders[n].merge_file_(shard)
                    indexed.remove_dataset(shard)
            now = time.perf_counter()
            if cfg.log_interval and (now - last_log >= cfg.log_interval):
                last_log = now
                el = now - t0
                tok_n = sum(tokens.values())
                eta = el / done_bytes * (total_bytes - done_bytes) if done_bytes else 0.0
                log(f"[preprocess] {docs} docs, {done_bytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB "
                    f"({100 * done_bytes / max(total_bytes, 1):.0f}%) | {docs / el:.1f} docs/s, "
                    f"{done_bytes / el / 1e6:.2f} MB/s, {tok_n / el:,.0f} tokens/s | ETA {_fmt_eta(eta)}")
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        if docs == 0:  # nothing to train on: leave no empty outputs behind that look like a dataset
            raise NothingWrittenError(_nothing_written_message(cfg, fmt, keys, stats), stats)
        if stats.rows_skipped > HIGH_SKIP_RATIO * stats.rows_read:
            log(f"warning: {stats.rows_skipped} of {stats.rows_read} rows "
                f"({100 * stats.rows_skipped / stats.rows_read:.0f}%) were skipped as bad rows; "
                f"check --format {cfg.format} and its keys (see the summary for the reasons)")
        for n in names:
            if cfg.join:
                builders[n].finalize(indexed.index_file_path(tmp[n]))
                indexed.move_dataset(tmp[n], final[n])
        if cfg.join:
            shutil.rmtree(shard_dir)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for n, b in builders.items():
            b.abort()
            indexed.remove_dataset(tmp[n])
        shutil.rmtree(shard_dir, ignore_errors=True)
        raise
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _WORKER_STATE.clear()
    outputs = final if cfg.join else {n: shard_dir for n in names}
    return PreprocessResult(outputs, docs, tokens, stats, time.perf_counter() - t0, text_bytes, total_bytes,
                            cfg.output_prefix)
