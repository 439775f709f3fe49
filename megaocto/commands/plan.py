"""`megaocto plan`: the parallel layouts that fit a model on a cluster, ranked by estimated step time."""
from __future__ import annotations

NAME = "plan"
HELP = ("List the layouts (tp, pp, dp, ZeRO-1, recompute, micro batch) that fit a preset on N GPUs, ranked by "
        "estimated step time, with every assumption printed.")


def add_arguments(parser) -> None:
    from megaocto.config.presets import preset_names
    from megaocto.model.plan import GPUS

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=preset_names(), help="model preset name")
    src.add_argument("--config", help="a `megaocto train` config (YAML/TOML): its model (with the file's overrides), "
                                      "seq_length, global batch and dtype; flags given here win")
    parser.add_argument("--gpus", type=int, required=True, help="total number of GPUs")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="sequence length (default: the preset's or the config's)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per optimizer step (required with --preset; default: the config's)")
    parser.add_argument("--gpu", default="a100", choices=sorted(GPUS),
                        help="GPU kind: peak TFLOP/s, achievable fraction, NVLink and network defaults "
                             "(default: %(default)s)")
    parser.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GB (default: the GPU kind's)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node sharing NVLink (default: %(default)s)")
    parser.add_argument("--network-gbit", type=float, default=None,
                        help="inter-node network per node in Gbit/s, all NICs together (default: the GPU kind's "
                             "DGX node: a100 1600, h100/h200 3200)")
    parser.add_argument("--nvlink-gbs", type=float, default=None,
                        help="NVLink GB/s per GPU per direction (default: a100 300, h100/h200 450)")
    parser.add_argument("--headroom", type=float, default=0.15,
                        help="fraction of GPU memory kept free (default: %(default)s)")
    parser.add_argument("--max-pp", type=int, default=None,
                        help="largest pipeline-parallel size to consider; 1 = no pipeline parallelism (default: any)")
    parser.add_argument("--no-overlap-grad-reduce", action="store_true",
                        help="model a trainer that reduces gradients after the backward (megaocto "
                             "train.overlap_grad_reduce false; Megatron-LM before --overlap-grad-reduce)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="training precision (default: the config's, else bf16)")
    parser.add_argument("--no-flash", action="store_true", help="count the s^2 attention matrices (no flash-attn)")
    parser.add_argument("--top", type=int, default=10, help="layouts to print (default: %(default)s)")


def run(args) -> int:
    import sys

    from megaocto.config.base import ConfigError
    from megaocto.config.model import ModelConfig
    from megaocto.model.plan import GPUS, Hardware, format_plan, parse_memory, plan

    try:
        for flag, value in (("--gpus", args.gpus), ("--global-batch", args.global_batch),
                            ("--gpus-per-node", args.gpus_per_node), ("--top", args.top)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1 (got {value})")
        if args.max_pp is not None and args.max_pp < 1:
            raise ValueError(f"--max-pp must be >= 1 (got {args.max_pp})")
        if args.config:
            from megaocto.config.loader import load_run_config

            run_cfg = load_run_config(args.config)
            cfg, name = run_cfg.model, args.config
            gbs = args.global_batch if args.global_batch is not None else run_cfg.train.global_batch_size
            dtype = args.dtype or run_cfg.train.dtype
            if gbs is None:
                raise ValueError(f"{args.config} sets no train.global_batch_size; give --global-batch")
        else:
            cfg, name = ModelConfig.from_preset(args.preset), args.preset
            gbs, dtype = args.global_batch, args.dtype or "bf16"
            if gbs is None:
                raise ValueError("--global-batch is required with --preset")
        seq = args.seq_length if args.seq_length is not None else cfg.seq_length
        if seq < 1:
            raise ValueError(f"--seq-length must be >= 1 (got {seq})")
        hw = Hardware(GPUS[args.gpu], args.gpus, gpus_per_node=args.gpus_per_node,
                      memory_gib=parse_memory(args.gpu_memory) if args.gpu_memory else None,
                      headroom=args.headroom, nvlink_gbs=args.nvlink_gbs, node_network_gbit=args.network_gbit)
        result = plan(cfg, hw, seq_len=seq, global_batch=gbs, dtype=dtype,
                      flash_attention=not args.no_flash, max_pp=args.max_pp,
                      overlap_grad_reduce=not args.no_overlap_grad_reduce, model=name)
        print(format_plan(result, top=args.top))
    except (ConfigError, ValueError) as e:
        print(f"megaocto {NAME}: error: {e}", file=sys.stderr)
        return 2
    return 0
