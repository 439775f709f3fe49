"""`megaocto preprocess`: jsonl → Megatron .bin/.idx (parallel, streamed, worker-count independent)."""
from __future__ import annotations

import sys

NAME = "preprocess"
HELP = "Tokenize jsonl files into Megatron .bin/.idx datasets (formats: text, commits-*, qa, magicoder, ...)"


def add_arguments(parser):
    from megaocto.data.formats import FORMATS

    fmts = "; ".join(f"{f.name}: {f.template}" for f in FORMATS.values())
    parser.add_argument("--input", nargs="+", required=True, help="input .jsonl files (processed in order)")
    parser.add_argument("--format", default="text", choices=list(FORMATS),
                        help=f"row format ({fmts}; default: %(default)s)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json, sentencepiece .model, or a directory")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (one core each; default: %(default)s)")
    parser.add_argument("--json-key", "--json-keys", dest="json_key", nargs="+", default=["text"],
                        help="json key(s) for --format text, one output dataset per key (Megatron --json-keys)")
    parser.add_argument("--keys", nargs="*", default=[], metavar="ROLE=KEY",
                        help="rename a format's input key, e.g. question=prompt answer=completion")
    parser.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                        help="bad rows: fail at the first (file:line: reason) or skip and count them "
                             "(default: %(default)s)")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                        help="do not append the EOD token to each document")
    bos = parser.add_mutually_exclusive_group()
    bos.add_argument("--prepend-bos", dest="prepend_bos", action="store_true", default=None,
                     help="put the BOS token in front of each document (default: when the tokenizer's add_bos is "
                          "set, i.e. Llama-family tokenizers)")
    bos.add_argument("--no-prepend-bos", dest="prepend_bos", action="store_false",
                     help="never put BOS in front of documents")
    parser.add_argument("--dtype", default="auto", choices=["auto", "uint16", "int32"],
                        help="token dtype (default: %(default)s: uint16 below 65500 tokens)")
    parser.add_argument("--chunk-mb", type=float, default=1.0,
                        help="input MB per work unit / shard (default: %(default)s)")
    parser.add_argument("--max-line-bytes", type=int, default=None,
                        help="longer jsonl lines are bad rows (default: 64 MiB)")
    parser.add_argument("--no-join", dest="join", action="store_false",
                        help="leave per-chunk shards in PREFIX_shards/ (join later with merge-datasets)")
    parser.add_argument("--log-interval", type=float, default=5.0,
                        help="seconds between progress lines, 0 = none (default: %(default)s)")


def run(args) -> int:
    from megaocto.data.cli_errors import run_cleanly

    return run_cleanly(NAME, _run, args)


def _run(args) -> int:
    from megaocto.data.cli_errors import print_stopped
    from megaocto.data.jsonl import BadRowError
    from megaocto.data.preprocess import NothingWrittenError, PreprocessConfig, preprocess

    key_map = {}
    for kv in args.keys:
        role, sep, key = kv.partition("=")
        if not sep:
            from megaocto.config.base import ConfigError
            raise ConfigError(f"--keys expects ROLE=KEY, got {kv!r}")
        key_map[role] = key
    cfg = PreprocessConfig(inputs=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer,
                           format=args.format, json_key=args.json_key, key_map=key_map, workers=args.workers,
                           on_error=args.on_error, append_eod=args.append_eod, prepend_bos=args.prepend_bos,
                           dtype=args.dtype,
                           chunk_bytes=max(1, int(args.chunk_mb * 2**20)), join=args.join,
                           log_interval=args.log_interval)
    if args.max_line_bytes:
        cfg.max_line_bytes = args.max_line_bytes
    try:
        result = preprocess(cfg)
    except BadRowError as e:
        return print_stopped(NAME, e)
    except NothingWrittenError as e:  # a data error (exit 1): every row was bad for this --format
        print(e.stats.summary(written=0), file=sys.stderr)
        print(f"megaocto {NAME}: error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0

