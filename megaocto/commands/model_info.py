"""`megaocto model-info`: parameter count, FLOPs per token and a per-GPU training-memory estimate."""
from __future__ import annotations

NAME = "model-info"
HELP = "Show a model preset's parameter count, FLOPs per token and estimated training memory per GPU."


def add_arguments(parser) -> None:
    from megaocto.config.presets import preset_names

    parser.add_argument("--preset", required=True, choices=preset_names(), help="model preset name")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: %(default)s)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default: %(default)s)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (shards optimizer states with --zero1; "
                        "default: %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=1, help="micro-batch size per GPU (default: %(default)s)")
    parser.add_argument("--seq-length", type=int, default=None, help="sequence length (default: the preset's)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="training precision (default: %(default)s)")
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                        help="activation recompute granularity (default: %(default)s)")
    parser.add_argument("--recompute-num-layers", type=int, default=1,
                        help="layers per checkpointed chunk (full; default: %(default)s)")
    parser.add_argument("--zero1", action="store_true", help="distributed optimizer (shard fp32 states over dp)")
    parser.add_argument("--no-sequence-parallel", action="store_true", help="disable sequence parallelism (tp>1)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="LoRA rank: count a frozen base (weights only) plus adapters (default: %(default)s = full "
                             "finetune)")
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated LoRA target modules (megaocto or HF names; default: model.lora's)")
    parser.add_argument("--no-flash", action="store_true", help="count the s^2 attention matrices (no flash-attn)")


def run(args) -> int:
    import sys

    from megaocto.config.base import ConfigError
    from megaocto.config.model import ModelConfig
    from megaocto.model.info import model_info_report

    try:
        for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--dp", args.dp),
                            ("--micro-batch", args.micro_batch), ("--recompute-num-layers", args.recompute_num_layers)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1 (got {value})")
        overrides = {}
        if args.seq_length is not None:
            if args.seq_length < 1:
                raise ValueError(f"--seq-length must be >= 1 (got {args.seq_length}); omit it to use the preset's "
                                 f"sequence length")
            overrides["seq_length"] = args.seq_length
        if args.lora_rank:
            from megaocto.config.model import LoraConfig

            targets = {"target_modules": args.lora_targets.split(",")} if args.lora_targets else {}
            overrides["lora"] = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, **targets)
        cfg = ModelConfig.from_preset(args.preset, **overrides)
        print(model_info_report(cfg, preset=args.preset, tp=args.tp, pp=args.pp, dp=args.dp,
                                micro_batch=args.micro_batch, dtype=args.dtype, recompute=args.recompute,
                                recompute_num_layers=args.recompute_num_layers, zero1=args.zero1,
                                sequence_parallel=not args.no_sequence_parallel, flash_attention=not args.no_flash))
    except (ConfigError, ValueError) as e:
        print(f"megaocto {NAME}: error: {e}", file=sys.stderr)
        return 2
    return 0
