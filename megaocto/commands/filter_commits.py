"""`megaocto filter-commits`: CommitPackFT filter rules over CommitPack-schema jsonl, with per-rule counts."""
from __future__ import annotations

import sys

NAME = "filter-commits"
HELP = "Apply the CommitPackFT filters (commitpackft_filters1/2) to commit jsonl; prints drops per rule"


def add_arguments(parser):
    parser.set_defaults(_parser=parser)  # run() reports missing --input/--output as argparse does
    parser.add_argument("--input", nargs="+", help="CommitPack-schema .jsonl files (required)")
    parser.add_argument("--output", help="filtered .jsonl to write (required)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the token-length rule")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the 90%% 'Bump' drop (keyed on seed, row; default: %(default)s)")
    parser.add_argument("--min-tokens", type=int, default=50, help="token-length lower bound (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=768, help="token-length upper bound (default: %(default)s)")
    parser.add_argument("--rules", nargs="+", default=None, help="only these rules (canonical order kept)")
    parser.add_argument("--skip-rules", nargs="+", default=None, help="leave these rules out")
    parser.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                        help="malformed rows: fail at the first or skip and count (default: %(default)s)")
    parser.add_argument("--list-rules", action="store_true", help="print the rules and exit")


def run(args) -> int:
    from megaocto.data.cli_errors import run_cleanly

    return run_cleanly(NAME, _run, args)


def _run(args) -> int:
    from megaocto.data.filters import RULES, FilterConfig, filter_commits
    from megaocto.data.cli_errors import print_stopped
    from megaocto.data.jsonl import BadRowError

    if args.list_rules:
        for r in RULES:
            print(f"{r.name:24s} [{r.source}] {r.doc}")
        return 0
    missing = [flag for flag, value in (("--input", args.input), ("--output", args.output)) if not value]
    if missing:  # required unless --list-rules: argparse's message, prefix and exit status 2
        args._parser.error(f"the following arguments are required: {', '.join(missing)} (or use --list-rules)")
    cfg = FilterConfig(seed=args.seed, tokenizer=args.tokenizer, min_tokens=args.min_tokens,
                       max_tokens=args.max_tokens, rules=args.rules, skip_rules=args.skip_rules,
                       on_error=args.on_error)
    try:
        filt = filter_commits(args.input, args.output, cfg)
    except BadRowError as e:
        return print_stopped(NAME, e)
    print(filt.report())
    print(filt.stats.summary(written=filt.kept))
    print(f"wrote {filt.kept} of {filt.seen} rows to {args.output}")
    note = filt.low_yield_note()
    if note:
        print(f"megaocto {NAME}: {note}", file=sys.stderr)
    return 0
