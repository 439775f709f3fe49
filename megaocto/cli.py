"""The `megaocto` command: one thin subcommand per module in `megaocto/commands/`.

Each command module defines::

    NAME = "model-info"                 # the subcommand
    HELP = "one line for --help"
    def add_arguments(parser): ...      # argparse arguments
    def run(args) -> int | None: ...    # calls one library function, prints, returns exit code

Commands are imported lazily so `megaocto --help` stays fast and a command's heavy imports
(torch, tokenizers) only load when it runs. A command with ``PASSTHROUGH = True`` (``megaocto torchrun``) gets its
arguments untouched as ``args._extra`` (no argparse: they are another program's options).

Errors of a command that runs as one process per rank (``megaocto train`` under torchrun or srun) go through
:func:`report_error`: printed once, by rank 0, and recorded for torchrun's failure report on every rank.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

import megaocto.commands as _commands


def env_rank(env=None) -> int:
    """This process's global rank from the launcher's variables: RANK (torchrun), else SLURM_PROCID, else 0."""
    env = os.environ if env is None else env
    return int(env.get("RANK", env.get("SLURM_PROCID", "0")))


def report_error(message: str, *, same_on_every_rank: bool = True, stream=None, env=None) -> None:
    """Report an error that ends this rank: rank 0 prints ``message`` (one line on stderr); every rank also writes it
    to torchrun's per-worker error file ($TORCHELASTIC_ERROR_FILE), which ``megaocto torchrun`` reads to show a
    message of another rank that differs from rank 0's. Where there is no such file (srun), another rank prints its
    message itself, prefixed ``[rank N]``, unless ``same_on_every_rank`` (the error came from inputs every rank
    shares, such as the config file and arguments, so rank 0 has printed the same text)."""
    env = os.environ if env is None else env
    stream = stream or sys.stderr
    rank = env_rank(env)
    if rank == 0:  # printed before it is recorded: a rank 0 stopped in between is at worst repeated, never lost
        print(message, file=stream, flush=True)
    error_file = env.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                json.dump({"message": message, "timestamp": int(time.time()), "megaocto": True}, f)
        except OSError:
            error_file = None
    if rank != 0 and not error_file and not same_on_every_rank:
        print(f"[rank {rank}] {message}", file=stream, flush=True)


def _command_modules():
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield info.name


def _read_header(module_name: str) -> tuple[str, str]:
    """Read NAME and HELP without importing the module (keeps --help cheap)."""
    import ast
    import os

    path = os.path.join(_commands.__path__[0], module_name + ".py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("NAME", "HELP") and isinstance(node.value, ast.Constant):
                values[node.targets[0].id] = node.value.value
    return values.get("NAME", module_name.replace("_", "-")), values.get("HELP", "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = {}
    for mod in _command_modules():
        name, help_ = _read_header(mod)
        names[name] = (mod, help_)
    if argv and argv[0] in names:
        module = importlib.import_module(f"megaocto.commands.{names[argv[0]][0]}")
        if getattr(module, "PASSTHROUGH", False):
            return int(module.run(argparse.Namespace(command=argv[0], _extra=list(argv[1:]))) or 0)
    parser = argparse.ArgumentParser(prog="megaocto", description="megaocto: Megatron-style tensor-parallel "
                                     "training for instruction-tuning code LLMs (OctoPack style).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen command is imported and gets its full argument list.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (mod, help_) in names.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            module = importlib.import_module(f"megaocto.commands.{mod}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"megaocto.commands.{names[args.command][0]}")
    if rest and not getattr(module, "ACCEPTS_EXTRA", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args._extra = rest  # e.g. `train`'s --section.field VALUE overrides
    code = args._run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
