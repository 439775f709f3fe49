"""`megaocto torchrun [torchrun options] -m megaocto.cli train ...`: torchrun with megaocto's exit codes.

Plain torchrun exits 1 whenever a worker fails and raises ``ChildFailedError``, printing a traceback and a failure
table after the worker's own error message. This runs the same torchrun (``torch.distributed.run``, same options)
and, when workers fail, exits with the first failed worker's own exit code (2 config error, 1 error/diverged,
42 preempted; a worker killed by signal N gives 128 + N) after one summary line, without that traceback. A
megaocto worker reports its error through ``megaocto.cli.report_error`` (printed by rank 0, recorded by every rank
in torchrun's error file); a recorded message of another rank that differs from rank 0's is printed here, so a
rank-specific error is not lost. launch/*.sh start local runs with it.
"""
from __future__ import annotations

import json
import os
import signal
import sys

NAME = "torchrun"
HELP = "torchrun (same options) that exits with the failed worker's exit code, without ChildFailedError's traceback."
PASSTHROUGH = True  # the arguments are torchrun's: megaocto.cli hands them over unparsed


def exit_code(code: int) -> int:
    """A worker's exit code as a shell reports it: a death by signal N (-N) becomes 128 + N."""
    return 128 - code if code < 0 else code


def _megaocto_message(data) -> str | None:
    """The message megaocto.cli.report_error recorded in a torchrun error file's JSON, else None."""
    if isinstance(data, dict) and data.get("megaocto") and isinstance(data.get("message"), str):
        return data["message"]
    return None


def _rank0_message(failures: dict) -> str | None:
    """What global rank 0 printed: its recorded message. When rank 0 is not among the failures (torchrun stopped it
    after another rank failed first) but runs on this node (a failure's global rank equals its local rank), its
    error file is read from the sibling folder torchrun gave it (<attempt dir>/0/error.json)."""
    if 0 in failures:
        return _megaocto_message(getattr(failures[0], "error_file_data", None))
    for rank, f in failures.items():
        if rank == f.local_rank and os.path.isfile(f.error_file or ""):
            sibling = os.path.join(os.path.dirname(os.path.dirname(f.error_file)), "0", "error.json")
            try:
                with open(sibling, encoding="utf-8") as fh:
                    return _megaocto_message(json.load(fh))
            except (OSError, ValueError):
                return None
    return None


def failure_report(failures: dict) -> tuple[int, list[str]]:
    """(exit code, lines to print) for torchrun's ``{global rank: ProcessFailure}``.

    The code is the earliest failure's (torchrun's root cause). Lines: each distinct megaocto error message that
    rank 0 has not printed itself (labelled with the lowest rank that recorded it), then one summary line."""
    # torchrun SIGTERMs the surviving workers once one fails, and the timestamps have 1 s resolution: a worker that
    # was only stopped that way is never the root cause while another failed on its own.
    own = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    first_rank, first = min(own.items(), key=lambda item: (item[1].timestamp, item[0]))
    shown = {_rank0_message(failures)}
    lines = []
    for rank in sorted(failures):
        message = _megaocto_message(getattr(failures[rank], "error_file_data", None))
        if rank != 0 and message is not None and message not in shown:
            lines.append(f"[rank {rank}] {message}")
            shown.add(message)
    code = exit_code(first.exitcode)
    signame = f", {first.signal_name()}" if first.exitcode < 0 else ""
    lines.append(f"megaocto torchrun: {len(failures)} worker(s) failed; exit code {code} "
                 f"(rank {first_rank}{signame})")
    return code, lines


def run(args) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    parsed = parse_args(args._extra)
    try:
        torchrun(parsed)
    except ChildFailedError as e:
        code, lines = failure_report(e.failures)
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        return code
    except SignalException as e:  # torchrun itself was signalled (preemption); it has stopped the workers
        sig = int(e.sigval)
        print(f"megaocto torchrun: stopped by {signal.Signals(sig).name}; the workers were stopped "
              f"(a preempted run records exit code 42 in its run dir's exit_reason.json)", file=sys.stderr, flush=True)
        return 128 + sig
    return 0
