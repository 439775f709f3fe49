"""`megaocto build-index --config FILE --dp N`: prebuild the data index caches a training run will need."""
from __future__ import annotations

import json
import os
import sys

NAME = "build-index"
HELP = "Prebuild GPT/packed index caches (doc/sample/shuffle, packing) for a run config, so ranks never wait."
ACCEPTS_EXTRA = True


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="The run config the training job will use (.yaml/.toml).")
    parser.add_argument("--dp", type=int, default=1, help="Data-parallel size of the training job (sets the "
                        "global batch, hence the sample counts; default: %(default)s).")
    parser.add_argument("--train-samples", type=int, default=None, help="Override the computed train sample count.")
    parser.add_argument("--valid-samples", type=int, default=None, help="Override the computed valid sample count.")
    parser.add_argument("--test-samples", type=int, default=0, help="Test samples to index (default: %(default)s).")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("SLURM_PROCID", 0)),
                        help="This worker's index when several share the work (default: $SLURM_PROCID or 0, "
                             "here %(default)s).")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("SLURM_NTASKS", 1)),
                        help="Number of workers sharing the work (default: $SLURM_NTASKS or 1, here "
                             "%(default)s).")


def run(args) -> int:
    from megaocto.config.base import ConfigError
    from megaocto.config.loader import load_run_config
    from megaocto.data.build import prebuild_indices

    try:
        cfg = load_run_config(args.config, list(args._extra))
        gbs = cfg.train.microbatches(args.dp) * cfg.train.micro_batch_size * args.dp
        if args.train_samples is None:
            from megaocto.training.loop import resolve_train_iters

            train = resolve_train_iters(cfg, gbs) * gbs
        else:
            train = args.train_samples
        valid = args.valid_samples
        if valid is None:
            valid = cfg.eval.iters * gbs if cfg.eval.interval > 0 and cfg.eval.iters > 0 else 0
        counts = {"train": train, "valid": valid, "test": args.test_samples}
        done = prebuild_indices(cfg.data, seq_length=cfg.model.seq_length, num_samples=counts, seed=cfg.train.seed,
                                rank=args.rank, world_size=args.world_size)
    except (ConfigError, ValueError, OSError) as e:
        print(f"megaocto {NAME}: error: {e}", file=sys.stderr)
        return 2
    print(f"megaocto build-index: rank {args.rank}/{args.world_size}, samples {counts}, "
          f"{len(done)} dataset(s) indexed")
    for summary in done:
        print(json.dumps(summary))
    return 0
