"""`megaocto convert`: checkpoint conversion — from-hf, to-hf, reshard, from-megatron (see docs/convert.md)."""
from __future__ import annotations

NAME = "convert"
HELP = "Convert checkpoints: HF GPTBigCode/GLM/Llama <-> megaocto, reshard TP, import bigcode Megatron-LM."

_VERIFY_HELP = ("run source and result on a fixed random batch and print the max absolute logit difference "
                "(fp32, one model in memory at a time); exit 1 when it is above --verify-tol")
_VERIFY_TOL_HELP = ("--verify's limit on the max abs logit difference (default: 1e-3, or 5e-2 x the source's max "
                    "|logit| with --dtype bf16/fp16)")


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _positive_float(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def _iteration(text: str):
    return text if text == "release" else int(text)


def _add_verify_and_quiet(p) -> None:
    """The flags every subcommand shares: --verify, --verify-tol, --quiet."""
    p.add_argument("--verify", action="store_true", help=_VERIFY_HELP)
    p.add_argument("--verify-tol", type=_positive_float, default=None, help=_VERIFY_TOL_HELP)
    p.add_argument("--quiet", action="store_true", help="no per-layer progress lines")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="convert_command", metavar="{from-hf,to-hf,reshard,from-megatron}")
    sub.required = True
    dtypes = ["bf16", "fp16", "fp32"]

    p = sub.add_parser("from-hf",
                       help="HF model directory (GPTBigCode, Glm, ChatGLM2/CodeGeeX2, Llama) -> megaocto checkpoint",
                       description="Convert a Hugging Face model directory to a megaocto release checkpoint.")
    p.add_argument("--hf", required=True,
                   help="HF model directory (config.json + *.safetensors or pytorch_model*.bin), or a hub id such as "
                        "bigcode/starcoderbase-1b[@revision] (downloaded into the HF cache: needs the network unless "
                        "already cached; HF_HUB_OFFLINE=1 uses the cache only)")
    p.add_argument("--output", required=True, help="new megaocto checkpoint directory (must not exist)")
    p.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor-parallel size to shard for (default: %(default)s)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="cast the weights (default: keep the source's)")
    p.add_argument("--lora", default=None, metavar="PEFT_DIR",
                   help="also read this PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) "
                        "onto the converted base; the checkpoint gets model.lora and the adapters")
    _add_verify_and_quiet(p)

    p = sub.add_parser("to-hf", help="megaocto checkpoint (any TP) -> HF model directory",
                       description="Export a megaocto checkpoint as a Hugging Face model directory "
                                   "(GPTBigCodeForCausalLM or GlmForCausalLM).")
    p.add_argument("--load", required=True,
                   help="megaocto checkpoint directory (with latest_checkpointed_iteration.txt)")
    p.add_argument("--output", required=True, help="new HF model directory (must not exist)")
    p.add_argument("--iteration", type=_iteration, default=None, help="iteration to export (default: the tracker's)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or tokenizer.json to copy alongside")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split model.safetensors above this size, with an index (default: %(default)s)")
    p.add_argument("--lora-format", choices=["peft"], default=None,
                   help="LoRA checkpoints: write the adapters as a PEFT adapter folder (adapter_config.json + "
                        "adapter_model.safetensors) for PeftModel.from_pretrained(base, DIR)")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA checkpoints: write a full HF model with the adapters merged into the base weights")
    p.add_argument("--base", default=None,
                   help="with --merge-lora: the base megaocto checkpoint (default: the one the LoRA run recorded)")
    _add_verify_and_quiet(p)

    p = sub.add_parser("reshard", help="megaocto checkpoint -> the same weights at another TP/PP size",
                       description="Reshard a megaocto checkpoint to another tensor- and pipeline-parallel size "
                                   "(weights only).")
    p.add_argument("--load", required=True, help="megaocto checkpoint directory")
    p.add_argument("--output", required=True, help="new megaocto checkpoint directory (must not exist)")
    p.add_argument("--tp", type=_positive_int, required=True, help="target tensor-parallel size")
    p.add_argument("--pp", type=_positive_int, default=1,
                   help="target pipeline-parallel size (layers split evenly; default: %(default)s)")
    p.add_argument("--iteration", type=_iteration, default=None, help="iteration to reshard (default: the tracker's)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="cast the weights (default: keep)")
    _add_verify_and_quiet(p)

    p = sub.add_parser("from-megatron", help="bigcode Megatron-LM checkpoint -> megaocto checkpoint",
                       description="Import a bigcode Megatron-LM GPT checkpoint "
                                   "(iter_*/mp_rank_XX[_YYY]/model_optim_rng.pt).")
    p.add_argument("--load", required=True, help="Megatron-LM checkpoint directory")
    p.add_argument("--output", required=True, help="new megaocto checkpoint directory (must not exist)")
    p.add_argument("--tp", type=_positive_int, default=None, help="output tensor-parallel size (default: the source's)")
    p.add_argument("--iteration", type=_iteration, default=None, help="iteration (default: the tracker's)")
    p.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="the tokenizer's vocabulary size, to drop Megatron's padding rows (default: keep them)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="cast the weights (default: keep)")
    _add_verify_and_quiet(p)


EXIT_SIGINT = 130  # 128 + SIGINT: Ctrl-C
EXIT_SIGTERM = 143  # 128 + SIGTERM: scancel, a job's time limit, kill


def _interrupt_handlers():
    """SIGTERM and SIGINT raise :class:`megaocto.convert.core.Interrupted` (the converters' AtomicDir then removes
    the partial output); a second signal during that cleanup is ignored so the cleanup finishes. Returns the
    previous handlers (restored by the caller)."""
    import signal

    from megaocto.convert.core import Interrupted

    def handler(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def _is_lora(load: str, iteration) -> bool:
    """Whether the checkpoint's metadata records a LoRA run (model.lora.rank > 0); False when unreadable (to_hf
    reports that)."""
    try:
        from megaocto.checkpoint.reader import checkpoint_info

        _, meta, _ = checkpoint_info(load, iteration)
        return int(((meta.get("config") or {}).get("model") or {}).get("lora", {}).get("rank", 0)) > 0
    except Exception:  # noqa: BLE001 - the regular path gives the precise error
        return False


def run(args) -> int:
    """Exit codes: 0 done; 2 a user error (bad arguments, files, config; nothing written); 1 ``--verify`` found the
    result above ``--verify-tol`` (the output is written), or an internal error (a bug: please report it);
    130 / 143 interrupted by SIGINT / SIGTERM (the partial output is removed; one line on stderr says so)."""
    import os
    import signal
    import sys
    import threading

    from megaocto.convert.core import Interrupted

    cmd = args.convert_command
    if args.verify_tol is not None and not args.verify:
        print(f"megaocto {NAME} {cmd}: error: --verify-tol needs --verify", file=sys.stderr)
        return 2
    tol = args.verify_tol
    existed = os.path.lexists(args.output)
    previous = _interrupt_handlers() if threading.current_thread() is threading.main_thread() else {}
    try:
        return _run(args, cmd, tol)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        if not existed and os.path.lexists(args.output):
            what = f"{args.output} was written completely before the signal (--verify did not finish)"
        else:
            what = f"nothing was written to {args.output} (the partial output was removed)"
        print(f"megaocto {NAME} {cmd}: interrupted by {signal.Signals(signum).name}; {what}", file=sys.stderr,
              flush=True)
        return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run(args, cmd: str, tol: float | None) -> int:
    import sys

    from megaocto.config.base import ConfigError
    from megaocto.convert.core import VerifyError

    try:
        if cmd == "from-hf" and args.lora:
            from megaocto.convert.peft import from_hf_with_adapter

            if args.verify:
                raise ConfigError("--verify is not supported with --lora (tests/test_lora_peft.py checks the mapping)")
            from_hf_with_adapter(args.hf, args.lora, args.output, tp=args.tp, dtype=args.dtype,
                                 progress=not args.quiet)
        elif cmd == "from-hf":
            from megaocto.convert.hf import from_hf

            from_hf(args.hf, args.output, tp=args.tp, dtype=args.dtype, verify=args.verify, progress=not args.quiet,
                    verify_tol=tol)
        elif cmd == "to-hf" and (args.lora_format or args.merge_lora or _is_lora(args.load, args.iteration)):
            from megaocto.convert import peft

            if bool(args.lora_format) == bool(args.merge_lora):
                raise ConfigError(f"{args.load} holds LoRA adapters: pass one of --lora-format peft (adapter folder) "
                                  f"or --merge-lora (full model with merged weights)")
            if args.lora_format:
                peft.export_peft(args.load, args.output, iteration=args.iteration, dtype=args.dtype)
            else:
                peft.merge_to_hf(args.load, args.output, iteration=args.iteration, base=args.base, dtype=args.dtype,
                                 tokenizer=args.tokenizer, max_shard_size=args.max_shard_size, verify=args.verify,
                                 progress=not args.quiet, verify_tol=tol)
        elif cmd == "to-hf":
            from megaocto.convert.hf import to_hf

            to_hf(args.load, args.output, dtype=args.dtype, tokenizer=args.tokenizer,
                  max_shard_size=args.max_shard_size, iteration=args.iteration, verify=args.verify,
                  progress=not args.quiet, verify_tol=tol)
        elif cmd == "reshard" and _is_lora(args.load, args.iteration):
            raise ConfigError(f"{args.load} holds LoRA adapters (and a reference to its base), which reshard does not "
                              f"lay out; export them (to-hf --lora-format peft) or merge them (to-hf --merge-lora)")
        elif cmd == "reshard":
            from megaocto.convert.reshard import reshard

            reshard(args.load, args.output, tp=args.tp, pp=args.pp, iteration=args.iteration, dtype=args.dtype,
                    verify=args.verify, progress=not args.quiet, verify_tol=tol)
        else:
            from megaocto.convert.megatron import convert_megatron

            convert_megatron(args.load, args.output, tp=args.tp, iteration=args.iteration, verify=args.verify,
                             vocab_size=args.vocab_size, dtype=args.dtype, progress=not args.quiet,
                             verify_tol=tol)
    except VerifyError as e:
        print(f"megaocto {NAME} {cmd}: verify failed: {e} (output: {args.output})", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, OSError) as e:
        print(f"megaocto {NAME} {cmd}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch / safetensors failures the checks did not foresee: a converter bug
        print(f"megaocto {NAME} {cmd}: internal error (please report): {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
