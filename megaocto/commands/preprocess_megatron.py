"""`megaocto preprocess-megatron`: Megatron tools/preprocess_data.py flags on top of `megaocto preprocess`."""
from __future__ import annotations

import sys

NAME = "preprocess-megatron"
HELP = ("Megatron tools/preprocess_data.py command line (--input --output-prefix --tokenizer-type --json-keys "
        "--workers --append-eod ...) -> {prefix}_{key}_document.bin/.idx, byte-identical to `megaocto preprocess`")


def add_arguments(parser):
    from megaocto.data.megatron_preprocess import add_arguments as megatron_arguments

    parser.description = (HELP + ". Flags megaocto cannot honour are refused with the reason, never ignored; "
                          "flags that only tune Megatron's speed (--chunk-size, --log-interval) are accepted.")
    megatron_arguments(parser)


def run(args) -> int:
    from megaocto.data.cli_errors import run_cleanly

    return run_cleanly(NAME, _run, args)


def _run(args) -> int:
    from megaocto.data.cli_errors import print_stopped
    from megaocto.data.jsonl import BadRowError
    from megaocto.data.megatron_preprocess import megatron_config
    from megaocto.data.preprocess import NothingWrittenError, preprocess

    with megatron_config(args) as (cfg, notes):
        for note in notes:
            print(f"megaocto {NAME}: note: {note}", file=sys.stderr)
        try:
            result = preprocess(cfg)
        except BadRowError as e:
            return print_stopped(NAME, e)
        except NothingWrittenError as e:
            print(e.stats.summary(written=0), file=sys.stderr)
            print(f"megaocto {NAME}: error: {e}", file=sys.stderr)
            return 1
    print(result.summary())
    return 0
