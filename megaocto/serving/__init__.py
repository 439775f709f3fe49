"""OpenAI-compatible serving of megaocto models (``megaocto serve``; usage: docs/serving.md).

``Engine`` (engine.py) decodes batches of rows with per-row settings over one KV cache; ``Batcher`` (batcher.py)
groups concurrent requests into those batches (and drives the other TP ranks); ``build_app`` (app.py) is the
Starlette app; ``serve(ServeConfig)`` (server.py) loads a checkpoint and runs uvicorn until SIGTERM.
"""
from megaocto.serving.engine import Engine, Event, RowRequest, RowResult, TokenLogprob

__all__ = ["Engine", "Event", "RowRequest", "RowResult", "TokenLogprob"]
