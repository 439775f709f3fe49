"""Clean command-line errors for the data commands: expected failures (a missing file, a bad dataset, a
non-repo path, a bad config) print one line on stderr and exit 2 instead of a traceback.

Exit status convention of the data commands (and model-info): 0 ok; 1 = a data error (a bad input row with
``--on-error fail``, or nothing left to write); 2 = a usage / config error (bad or missing arguments, a missing
input / tokenizer / dataset file, a bad config). Every error line reads ``megaocto COMMAND: error: ...``."""
from __future__ import annotations

import sys


def expected_errors() -> tuple[type[BaseException], ...]:
    """The error types a data command reports as one line (programming errors keep their traceback)."""
    from megaocto.config.base import ConfigError
    from megaocto.data.formats import FormatError
    from megaocto.data.git_commits import GitError
    from megaocto.data.indexed import IndexedDatasetError
    from megaocto.data.tokenizer import TokenizerError

    return (ConfigError, FormatError, GitError, IndexedDatasetError, TokenizerError, OSError)


def report_error(command: str, err: BaseException, code: int = 2) -> int:
    print(f"megaocto {command}: error: {err}", file=sys.stderr)
    return code


def run_cleanly(command: str, fn, args) -> int:
    """``fn(args)``, with :func:`expected_errors` printed by :func:`report_error` (exit status 2)."""
    try:
        return fn(args)
    except expected_errors() as e:
        return report_error(command, e)


def print_stopped(command: str, err, hint: str = "re-run with --on-error skip to skip and count bad rows") -> int:
    """The bad-input summary (rows read, written, skipped and why) and the row that stopped the run, on stderr;
    returns the data-error exit status 1."""
    if getattr(err, "stats", None) is not None:
        print(err.stats.summary(written=0), file=sys.stderr)
    print(f"megaocto {command}: error: {err}\nstopped at the first bad row (--on-error fail); nothing was written. "
          f"({hint})", file=sys.stderr)
    return 1
