"""`megaocto serve --load CKPT`: an OpenAI-compatible HTTP endpoint over a megaocto checkpoint.

Single process, or under torchrun/srun with the checkpoint's tp (rank 0 serves HTTP, every rank decodes).
"""
from __future__ import annotations

import sys

NAME = "serve"
HELP = "Serve a megaocto checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."

EPILOG = """\
Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health. Concurrent requests
are decoded together in shared KV-cache batches of up to --max-batch rows. SIGTERM/SIGINT stops the server after
the running requests. tp > 1: torchrun --nproc_per_node 2 -m megaocto.cli serve --load CKPT. See docs/serving.md."""


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--iteration", default=None, help="iteration number or 'release' (default: the latest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the checkpoint's data.tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    parser.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="wait this long for more requests before a batch starts (default: %(default)s)")
    parser.add_argument("--model-name", default=None, help="served model id (default: the checkpoint dir name)")
    parser.add_argument("--chat-template", default=None, choices=["magicoder", "octocoder", "plain"],
                        help="chat format (default: from the checkpoint's metadata, else plain)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="prompt + completion tokens per request (default: the model's limit / seq_length)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the checkpoint's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--graceful-timeout", type=int, default=30,
                        help="seconds running requests may take after SIGTERM (default: %(default)s)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    import os

    from megaocto.config.base import ConfigError
    from megaocto.data.tokenizer import TokenizerError
    from megaocto.serving.server import ServeConfig, serve

    iteration = args.iteration
    try:
        if iteration is not None and iteration != "release":
            if not iteration.isdigit():
                raise ValueError(f"--iteration must be a number or 'release' (got {iteration!r})")
            iteration = int(iteration)
        cfg = ServeConfig(load=args.load, tokenizer=args.tokenizer, host=args.host, port=args.port,
                          max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, model_name=args.model_name,
                          chat_template=args.chat_template, context_length=args.context_length, tp=args.tp,
                          dtype=args.dtype, iteration=iteration, graceful_timeout_s=args.graceful_timeout,
                          log_level=args.log_level)
        return serve(cfg)
    except (ConfigError, TokenizerError, ValueError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megaocto serve: error: {e}", file=sys.stderr)
        return 2
