"""`megaocto generate --load CKPT --prompt "..."`: complete prompts with a megaocto checkpoint (KV-cached decoding).

Single process, or under torchrun/srun with the checkpoint's tp (every TP rank decodes; global rank 0 prints,
errors included).
"""
from __future__ import annotations

import sys

NAME = "generate"
HELP = "Complete prompts with a megaocto checkpoint (greedy or sampled, KV cache, works at tp > 1)."

EPILOG = """\
Prompts: --prompt TEXT (repeatable) and/or --prompt-file F (the whole file is one prompt; a .jsonl file gives
one prompt per line from its "prompt" key or a bare JSON string). The tokenizer comes from --tokenizer or the
checkpoint's data.tokenizer. Output: each completion on stdout, under a '### prompt I sample J' header when
there are several (--jsonl: one {"prompt_index", "sample", "completion"} object per line).
Under torchrun: torchrun --nproc_per_node 2 -m megaocto.cli generate --load CKPT --prompt "def f(" (tp is
taken from the checkpoint unless --tp is given)."""


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--load", required=True, help="checkpoint directory (a run's checkpoint.save, or converted)")
    parser.add_argument("--iteration", default=None,
                        help="iteration number or 'release' (default: latest_checkpointed_iteration.txt)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompt-file", action="append", default=[], help="file holding a prompt (or .jsonl)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json / .model (default: the checkpoint's "
                        "data.tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, 1 = off (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default: %(default)s)")
    parser.add_argument("--stop", nargs="+", action="extend", default=[],
                        help="stop strings: a completion is cut at the earliest one (escapes like \\n are decoded)")
    parser.add_argument("--no-eos-stop", action="store_true", help="do not stop at the tokenizer's EOD token")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="rows decoded together, prompts sorted by length (default: %(default)s)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the checkpoint's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="parameter dtype (auto = as saved; default: %(default)s)")
    parser.add_argument("--jsonl", action="store_true", help="print JSON lines instead of plain text")


def _read_prompts(args) -> list[str]:
    import json

    prompts = list(args.prompt)
    for path in args.prompt_file:
        try:
            text = open(path, encoding="utf-8").read()
        except OSError as e:
            raise ValueError(f"--prompt-file {path}: {e.strerror}") from None
        if not path.endswith(".jsonl"):
            prompts.append(text)
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append(row["prompt"])
            elif isinstance(row, str):
                prompts.append(row)
            else:
                raise ValueError(f"{path}:{n}: expected a JSON string or an object with a string \"prompt\"")
    if not prompts:
        raise ValueError("no prompt given: pass --prompt TEXT or --prompt-file F")
    return prompts


def _decode_escapes(s: str) -> str:
    """``s`` with backslash escapes (``\\n``, ``\\t``, ``\\x41``, ...) decoded; ValueError naming --stop if one is
    malformed."""
    if "\\" not in s:
        return s
    try:
        return s.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except UnicodeError as e:
        raise ValueError(f"--stop {s!r}: invalid escape sequence ({e.reason}); write a literal backslash as "
                         f"\\\\") from None


def run(args) -> int:
    import json
    import os

    from megaocto.config.base import ConfigError
    from megaocto.data.tokenizer import TokenizerError

    def fail(message: str) -> int:
        # under torchrun every rank fails the same way: one message (global rank 0's) is enough
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megaocto generate: error: {message}", file=sys.stderr)
        return 2

    try:
        for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 0), ("--num-samples", args.num_samples, 1),
                                 ("--top-k", args.top_k, 0), ("--batch-size", args.batch_size, 1),
                                 ("--temperature", args.temperature, 0.0)):
            if value < low:
                raise ValueError(f"{flag} must be >= {low} (got {value})")
        if not 0.0 < args.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1] (got {args.top_p})")
        stops = tuple(_decode_escapes(s) for s in args.stop)
        if any(s == "" for s in stops):
            raise ValueError("--stop: a stop string must not be empty")
        prompts = _read_prompts(args)
        iteration = args.iteration
        if iteration is not None and iteration != "release":
            if not iteration.isdigit():
                raise ValueError(f"--iteration must be a number or 'release' (got {iteration!r})")
            iteration = int(iteration)
    except ValueError as e:
        return fail(str(e))

    import torch

    from megaocto.generation import GenerationConfig, generate_text, load_checkpoint_model, load_tokenizer
    from megaocto.generation.loading import checkpoint_metadata
    from megaocto.parallel.context import ParallelContext

    try:
        meta, iteration = checkpoint_metadata(args.load, iteration)
        tp = args.tp if args.tp is not None else int(meta.get("tp", 1))
        pc = ParallelContext.init(tp=tp)
        tok_path = args.tokenizer or ((meta.get("config") or {}).get("data") or {}).get("tokenizer") or ""
        if not tok_path:
            raise ConfigError(f"{args.load}: the checkpoint's config has no data.tokenizer; pass --tokenizer PATH")
        tokenizer = load_tokenizer(tok_path)
        dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        model, cfg = load_checkpoint_model(args.load, pc, dtype=dtype, iteration=iteration)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ConfigError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                              f"{cfg.vocab_size}: use the tokenizer the model was trained with")
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               top_k=args.top_k, seed=args.seed, stop=stops,
                               eos_id=-1 if args.no_eos_stop else tokenizer.eod, num_samples=args.num_samples)
        completions = generate_text(model, tokenizer, prompts, gen, pc, use_cache=not args.no_cache,
                                    batch_size=args.batch_size)
    except (ConfigError, TokenizerError, ValueError) as e:
        return fail(str(e))
    if pc.rank == 0:
        several = len(completions) > 1
        for k, text in enumerate(completions):
            i, j = divmod(k, args.num_samples)
            if args.jsonl:
                print(json.dumps({"prompt_index": i, "sample": j, "completion": text}))
            else:
                if several:
                    print(f"### prompt {i} sample {j}")
                print(text)
        sys.stdout.flush()
    return 0
