"""``serve(ServeConfig)``: load a megaocto checkpoint and serve it over HTTP until SIGTERM/SIGINT.

Single process, or under torchrun/srun with the checkpoint's tp: global rank 0 runs the HTTP server (uvicorn)
and the batch worker; every rank decodes every batch (:func:`megaocto.serving.batcher.follower_loop`). On
SIGTERM uvicorn stops accepting connections, lets running requests finish (up to ``graceful_timeout_s``), then
the worker finishes the queued batches, tells the other ranks to stop, and every rank exits with 0.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

# The TP followers wait in a broadcast while the server is idle: the process-group timeout must outlast any idle
# period (the default of 10 minutes would kill an idle server).
IDLE_TIMEOUT_MINUTES = 60 * 24 * 30


@dataclasses.dataclass
class ServeConfig:
    """Settings of ``megaocto serve``.

    Attributes:
        load: checkpoint directory (a run's checkpoint.save, or a converted one).
        tokenizer: tokenizer path (default: the checkpoint's data.tokenizer).
        host: interface to bind.
        port: TCP port.
        max_batch: most rows (prompts × n) decoded together in one batch.
        batch_wait_ms: how long the worker waits for more requests after the first one of a batch.
        model_name: id in /v1/models and the ``model`` requests must name (default: the checkpoint directory's
            base name).
        chat_template: magicoder | octocoder | plain; default: from the checkpoint's metadata (``plain`` when it
            names none).
        context_length: most prompt + completion tokens per row (default: the model's position limit, else its
            seq_length).
        tp: tensor-parallel size (default: the checkpoint's).
        dtype: auto (as saved) | fp32 | bf16 | fp16.
        iteration: checkpoint iteration or "release" (default: the tracker's).
        graceful_timeout_s: on SIGTERM, how long running requests may take to finish.
        log_level: uvicorn's log level.
    """
    load: str
    tokenizer: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    model_name: str | None = None
    chat_template: str | None = None
    context_length: int | None = None
    tp: int | None = None
    dtype: str = "auto"
    iteration: int | str | None = None
    graceful_timeout_s: int = 30
    log_level: str = "warning"


def model_context_length(model) -> int:
    """The most positions a row can use: the model's position limit (learned positions), else its seq_length."""
    from megaocto.generation import position_limit

    limit = position_limit(model)
    return limit if limit is not None else int(model.cfg.seq_length)


def serve(cfg: ServeConfig) -> int:
    import torch

    from megaocto.config.base import ConfigError
    from megaocto.generation import load_checkpoint_model, load_tokenizer
    from megaocto.generation.loading import checkpoint_metadata
    from megaocto.parallel.context import ParallelContext
    from megaocto.serving.batcher import Batcher, follower_loop
    from megaocto.serving.engine import Engine
    from megaocto.serving.templates import TEMPLATES, template_from_metadata

    if cfg.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1 (got {cfg.max_batch})")
    if cfg.chat_template is not None and cfg.chat_template not in TEMPLATES:
        raise ValueError(f"--chat-template must be one of {', '.join(TEMPLATES)} (got {cfg.chat_template!r})")
    meta, iteration = checkpoint_metadata(cfg.load, cfg.iteration)
    tp = cfg.tp if cfg.tp is not None else int(meta.get("tp", 1))
    pc = ParallelContext.init(tp=tp, timeout_minutes=IDLE_TIMEOUT_MINUTES)
    if pc.world_size != pc.tp:
        raise ConfigError(f"megaocto serve runs one model replica: world size {pc.world_size} must equal tp {pc.tp} "
                          f"(start one server per replica)")
    tok_path = cfg.tokenizer or ((meta.get("config") or {}).get("data") or {}).get("tokenizer") or ""
    if not tok_path:
        raise ConfigError(f"{cfg.load}: the checkpoint's config has no data.tokenizer; pass --tokenizer PATH")
    tokenizer = load_tokenizer(tok_path)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    model, mcfg = load_checkpoint_model(cfg.load, pc, dtype=dtype, iteration=iteration)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{mcfg.vocab_size}: use the tokenizer the model was trained with")
    limit = model_context_length(model)
    context = limit if cfg.context_length is None else cfg.context_length
    if not 1 < context <= limit:
        raise ConfigError(f"--context-length must be in [2, {limit}] for this model (got {context})")
    engine = Engine(model, tokenizer, pc)
    if pc.rank != 0:
        # A SIGTERM reaches every rank (torchrun, srun); the followers are blocked in a collective and leave when
        # rank 0, after its graceful shutdown, broadcasts the stop. If rank 0 dies instead, the launcher kills them.
        signal.signal(signal.SIGTERM, lambda _s, _f: None)
        signal.signal(signal.SIGINT, lambda _s, _f: None)
        follower_loop(engine, pc)
        print(f"megaocto serve: rank {pc.rank} stopped", file=sys.stderr, flush=True)
        return 0

    import uvicorn

    from megaocto.serving.app import ServerState, build_app

    batcher = Batcher(engine, max_batch=cfg.max_batch, batch_wait_s=cfg.batch_wait_ms / 1000.0, pc=pc)
    name = cfg.model_name or os.path.basename(os.path.normpath(cfg.load))
    state = ServerState(model_name=name, tokenizer=tokenizer, batcher=batcher, context_length=context,
                        chat_template=cfg.chat_template or template_from_metadata(meta), created=int(time.time()))
    app = build_app(state)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                           timeout_graceful_shutdown=cfg.graceful_timeout_s, access_log=False))
    print(f"megaocto serve: model '{name}' ({mcfg.family}, tp={pc.tp}, context {context}, chat template "
          f"{state.chat_template}) on http://{cfg.host}:{cfg.port}/v1", file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM/SIGINT while it runs (graceful shutdown) and re-raises the signal to the handler that
    # was installed before it: ours records it, so the process gets to stop the worker and the other ranks.
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: received.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        batcher.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("megaocto serve: stopped" + (" (rank 0)" if pc.world_size > 1 else ""), file=sys.stderr, flush=True)
    return 0 if server.started else 1
