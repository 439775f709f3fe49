"""`megaocto tokenizer train|info`: train a StarCoder-style byte-level BPE, or describe a tokenizer."""
from __future__ import annotations

import os
import sys

NAME = "tokenizer"
HELP = "Train a byte-level BPE with StarCoder's special tokens (train) or describe a tokenizer (info)"
LOW_VOCAB_RATIO = 0.9  # warn when the trained vocab is below this fraction of --vocab-size


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE (StarCoder special tokens at ids 0..18)")
    t.add_argument("--input", nargs="+", required=True, help=".jsonl files (read by --json-keys) or text files")
    t.add_argument("--json-keys", nargs="+", default=["text"],
                   help="jsonl keys whose strings are training text (e.g. old_contents new_contents; "
                                                        "default: %(default)s)")
    t.add_argument("--vocab-size", type=int, required=True, help="target vocabulary size incl. special tokens")
    t.add_argument("--min-frequency", type=int, default=2,
                   help="minimum pair frequency for a merge (default: %(default)s)")
    t.add_argument("--output", required=True, help="path of the tokenizer.json to write")
    i = sub.add_parser("info", help="print vocab size and special token ids")
    i.add_argument("path", help="tokenizer.json, a sentencepiece .model, or a directory holding one")


def run(args) -> int:
    from megaocto.data.cli_errors import run_cleanly

    return run_cleanly(NAME, _run, args)


def _run(args) -> int:
    from megaocto.data.tokenizer import STARCODER_SPECIAL_TOKENS, load_tokenizer, train_bpe_tokenizer

    if args.action == "train":
        missing = [p for p in args.input if not os.path.isfile(p)]
        if missing:
            print(f"megaocto {NAME}: error: input file(s) not found: {', '.join(missing)}", file=sys.stderr)
            return 2
        info = train_bpe_tokenizer(args.input, args.vocab_size, args.output, min_frequency=args.min_frequency,
                                   json_keys=args.json_keys)
        print(f"wrote {info['output']}: vocab {info['vocab_size']} (requested {info['vocab_size_requested']})")
        got, want = info["vocab_size"], info["vocab_size_requested"]
        if got < LOW_VOCAB_RATIO * want:
            print(f"megaocto {NAME}: warning: vocab {got} is only {100 * got / want:.0f}% of the requested {want}: "
                  f"the corpus ran out of merges (too little text, or --json-keys reads the wrong keys); use more "
                  f"data or a smaller --vocab-size", file=sys.stderr)
        elif got < want:
            print("  the corpus ran out of merges before the requested size")
        for reason, n in info["skipped"].items():
            print(f"  skipped {n}: {reason}")
        return 0
    tok = load_tokenizer(args.path)
    print(f"{tok.path}: {type(tok).__name__}, vocab {tok.vocab_size}, eod {tok.eod}, pad {tok.pad}, bos {tok.bos}, "
          f"add_bos {tok.add_bos}")
    for t in STARCODER_SPECIAL_TOKENS:
        tid = tok.token_to_id(t)
        if tid is not None:
            print(f"  {tid:6d} {t}")
    return 0
