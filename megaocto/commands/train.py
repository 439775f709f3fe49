"""`megaocto train --config FILE [--section.field VALUE ...]`: run training (single process, torchrun or srun)."""
from __future__ import annotations


NAME = "train"
HELP = "Train a model from a YAML/TOML run config; --section.field VALUE overrides any config field."
ACCEPTS_EXTRA = True


EPILOG = """\
Any config field can be overridden on the command line as --section.field VALUE
(or --section.field=VALUE), e.g.:
  megaocto train --config launch/configs/tiny-bigcode.yaml --train.iters 20 --optimizer.lr 3e-4
Sections: model, parallel, data, train, optimizer, schedule, checkpoint, logging, eval.
Without --config every required field must come from overrides (at least one of
--train.iters / --train.samples / --train.epochs). Exit codes: 0 done, 1 error/diverged, 2 config error,
42 preempted (checkpoint saved; requeue). Errors are printed once, by rank 0. Several processes:
  megaocto torchrun --standalone --nproc_per_node 2 -m megaocto.cli train --config ... --parallel.tp 2
(torchrun's options; unlike plain torchrun it exits with the worker's code above and prints no ChildFailedError
traceback). Every field and default: docs/training.md."""


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--config", default=None, help="Run config file (.yaml/.yml/.toml); see docs/training.md.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")


def run(args) -> int:
    # Errors are printed once, by rank 0 (report_error), and every rank exits with the code: under torchrun use
    # `megaocto torchrun` to get that code and no ChildFailedError traceback (see megaocto/commands/torchrun.py).
    from megaocto.cli import report_error
    from megaocto.config.base import ConfigError
    from megaocto.config.loader import config_to_dict, load_run_config

    if args.config is None and not args._extra:
        report_error("megaocto train: --config FILE is required (or give every required field as --section.field "
                     "VALUE overrides, e.g. --train.iters 100); see megaocto train --help and docs/training.md")
        return 2
    try:
        cfg = load_run_config(args.config, list(args._extra))
    except ConfigError as e:  # the same file and arguments on every rank: the same error
        hint = " (no --config given: every required field must come from --section.field VALUE overrides)" \
            if args.config is None else ""
        report_error(f"megaocto train: config error: {e}{hint}")
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from megaocto.training.loop import TrainingDiverged, train

    try:
        result = train(cfg)
    except ConfigError as e:  # may name a rank's own checkpoint shard: other ranks' differing messages are kept
        report_error(f"megaocto train: config error: {e}", same_on_every_rank=False)
        return 2
    except TrainingDiverged as e:  # all ranks agree on divergence
        report_error(f"megaocto train: {e}")
        return 1
    if result.rank == 0:
        print(f"megaocto train: {result.exit_reason} at step {result.iteration} "
              f"({result.consumed_samples} samples, {result.skipped_steps} skipped steps); exit code {result.exit_code}")
    return result.exit_code
