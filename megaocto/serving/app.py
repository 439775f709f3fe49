"""The OpenAI-compatible HTTP app (Starlette, served by uvicorn): ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, ``/health``.

Handlers validate the body (:mod:`megaocto.serving.protocol`), tokenize, refuse requests over the context
length, and hand the rows to the :class:`~megaocto.serving.batcher.Batcher`; streamed requests get server-sent
events (``data: {chunk}`` ... ``data: [DONE]``) as the batch decodes.
"""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from megaocto.serving.batcher import Batcher
from megaocto.serving.engine import RowRequest, RowResult, TokenLogprob
from megaocto.serving.protocol import APIError, SamplingRequest, new_id, now, parse_chat, parse_completion
from megaocto.serving.templates import TemplateError, render_chat


@dataclass
class ServerState:
    """What the handlers need.

    Attributes:
        model_name: the id served in ``/v1/models`` (requests naming another model get 404).
        tokenizer: the model's tokenizer.
        batcher: the decode queue.
        context_length: most prompt + completion tokens per row.
        chat_template: name of the template in :mod:`megaocto.serving.templates`.
    """
    model_name: str
    tokenizer: object
    batcher: Batcher
    context_length: int
    chat_template: str
    created: int = 0


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _seed_for(seed: int, sample: int) -> int:
    return (seed * 1_000_003 + sample) % (2 ** 63) if sample else seed


def _rows(state: ServerState, req: SamplingRequest, prompts: list[list[int]], max_tokens: list[int]
          ) -> list[RowRequest]:
    base = req.seed if req.seed is not None else random.getrandbits(62)
    rows = []
    for i, (ids, m) in enumerate(zip(prompts, max_tokens)):
        for j in range(req.n):
            rows.append(RowRequest(prompt=ids, max_new_tokens=m, temperature=req.temperature, top_p=req.top_p,
                                   top_k=req.top_k, seed=_seed_for(base + i, j),
                                   repetition_penalty=req.repetition_penalty, stop=req.stop,
                                   eos_id=None if req.ignore_eos else state.tokenizer.eod, logprobs=req.logprobs))
    return rows


def _budget(state: ServerState, req: SamplingRequest, ids: list[int], where: str) -> int:
    """max_tokens for a prompt of ``len(ids)`` tokens (default: the rest of the context), or a 400 refusal."""
    ctx = state.context_length
    if req.max_tokens is None:
        if len(ids) >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {where} "
                                f"has {len(ids)} tokens, which leaves no room for a completion. Please reduce the "
                                f"length of the {where}.", param=where, code="context_length_exceeded")
        return ctx - len(ids)
    if len(ids) + req.max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{len(ids) + req.max_tokens} tokens ({len(ids)} in the {where}, {req.max_tokens} in the "
                            f"completion). Please reduce the length of the {where} or of max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return req.max_tokens


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{state.model_name}' "
                            f"(GET /v1/models)", param="model", code="model_not_found")


async def _json_body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _token_str(tok, i: int) -> str:
    return tok.decode([i])


def _completion_logprobs(tok, infos: list[TokenLogprob], offset0: int) -> dict:
    tokens, offsets, off = [], [], offset0
    for t in infos:
        s = _token_str(tok, t.token)
        tokens.append(s)
        offsets.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in infos],
            "top_logprobs": [{_token_str(tok, i): lp for i, lp in t.top} for t in infos], "text_offset": offsets}


def _chat_logprobs(tok, infos: list[TokenLogprob]) -> dict:
    def entry(i, lp):
        s = _token_str(tok, i)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [dict(entry(t.token, t.logprob), top_logprobs=[entry(i, lp) for i, lp in t.top])
                        for t in infos]}


def _usage(prompts: list[list[int]], results: list[RowResult]) -> dict:
    p = sum(len(x) for x in prompts)
    c = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def build_app(state: ServerState) -> Starlette:
    tok = state.tokenizer

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    async def model(request: Request):
        name = request.path_params["name"]
        try:
            _check_model(state, name)
        except APIError as e:
            return _error(e)
        return JSONResponse(_model_card(state))

    async def health(request: Request):
        b = state.batcher
        return JSONResponse({"status": "ok", "batches": b.batches_run, "rows": b.rows_run,
                             "max_rows_in_batch": b.max_rows_in_batch})

    async def completions(request: Request):
        try:
            req, prompts = parse_completion(await _json_body(request))
            _check_model(state, req.model)
            ids = [tok.encode(p) or [tok.eod] if isinstance(p, str) else p for p in prompts]
            for p in ids:
                if any(t < 0 or t >= tok.vocab_size for t in p):
                    raise APIError(400, f"'prompt' has a token id outside [0, {tok.vocab_size})", param="prompt",
                                   code="invalid_value")
            budgets = [_budget(state, req, p, "prompt") for p in ids]
        except APIError as e:
            return _error(e)
        rows = _rows(state, req, ids, budgets)
        texts = [p if isinstance(p, str) else tok.decode(p) for p in prompts]
        if req.stream:
            return _stream(state, req, rows, ids, chat=False)
        try:
            results = await _run(state, rows)
        except APIError as e:
            return _error(e)
        choices = []
        for k, r in enumerate(results):
            prefix = texts[k // req.n] if req.echo else ""
            choices.append({"index": k, "text": prefix + r.text, "finish_reason": r.finish_reason,
                            "logprobs": None if req.logprobs is None else
                            _completion_logprobs(tok, r.tokens, len(prefix))})
        return JSONResponse({"id": new_id("cmpl"), "object": "text_completion", "created": now(),
                             "model": state.model_name, "choices": choices, "usage": _usage(ids, results)})

    async def chat(request: Request):
        try:
            req, messages = parse_chat(await _json_body(request))
            _check_model(state, req.model)
            try:
                prompt = render_chat(messages, state.chat_template)
            except TemplateError as e:
                raise APIError(400, str(e), param="messages", code="invalid_value") from None
            ids = [tok.encode(prompt) or [tok.eod]]
            budgets = [_budget(state, req, ids[0], "messages")]
        except APIError as e:
            return _error(e)
        rows = _rows(state, req, ids, budgets)
        if req.stream:
            return _stream(state, req, rows, ids, chat=True)
        try:
            results = await _run(state, rows)
        except APIError as e:
            return _error(e)
        choices = [{"index": k, "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                    "logprobs": None if req.logprobs is None else _chat_logprobs(tok, r.tokens)}
                   for k, r in enumerate(results)]
        return JSONResponse({"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(),
                             "model": state.model_name, "choices": choices, "usage": _usage(ids, results)})

    async def not_found(request: Request, exc: HTTPException):
        status = exc.status_code
        message = (f"no route {request.method} {request.url.path}; this server has /v1/models, /v1/completions "
                   f"and /v1/chat/completions") if status in (404, 405) else str(exc.detail)
        return _error(APIError(status, message, code="not_found" if status == 404 else None))

    async def server_error(request: Request, exc: Exception):
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: server_error})


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "megaocto",
            "max_model_len": state.context_length}


async def _run(state: ServerState, rows: list[RowRequest]) -> list[RowResult]:
    try:
        fut = state.batcher.submit(rows)
    except RuntimeError as e:
        raise APIError(503, str(e), type_="server_error") from None
    try:
        return await asyncio.wrap_future(fut)
    except Exception as e:
        raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error") from None


def _stream(state: ServerState, req: SamplingRequest, rows: list[RowRequest], prompts: list[list[int]], *,
            chat: bool) -> StreamingResponse:
    tok = state.tokenizer
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_event(k, event):  # worker thread
        loop.call_soon_threadsafe(events.put_nowait, (k, event))

    try:
        fut = state.batcher.submit(rows, on_event)
    except RuntimeError as e:
        err = APIError(503, str(e), type_="server_error")
        return StreamingResponse(iter([f"data: {json.dumps(err.body())}\n\n"]), media_type="text/event-stream")
    fut.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f)))
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None):
        body = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def gen():
        started = set()
        offsets = [0] * len(rows)
        while True:
            k, event = await events.get()
            if k == "done":
                exc = event.exception()
                if exc is not None:
                    err = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type_="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                if req.include_usage:
                    yield chunk([], _usage(prompts, event.result()))
                yield "data: [DONE]\n\n"
                return
            if chat:
                delta = {"content": event.text}
                if k not in started:
                    delta["role"] = "assistant"
                    started.add(k)
                choice = {"index": k, "delta": delta, "finish_reason": event.finish_reason,
                          "logprobs": None if req.logprobs is None else _chat_logprobs(tok, event.tokens)}
            else:
                choice = {"index": k, "text": event.text, "finish_reason": event.finish_reason,
                          "logprobs": None if req.logprobs is None else
                          _completion_logprobs(tok, event.tokens, offsets[k])}
                offsets[k] += len(event.text)
            yield chunk([choice])

    return StreamingResponse(gen(), media_type="text/event-stream")
