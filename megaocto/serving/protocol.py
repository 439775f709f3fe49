"""OpenAI request validation and response bodies for ``/v1/completions`` and ``/v1/chat/completions``.

Errors are :class:`APIError` with the HTTP status and OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``: 400 for a value out of range, an over-long request or a
malformed body, 404 for an unknown model or route, 422 for a missing field or a field of the wrong type.
"""
from __future__ import annotations

import dataclasses
import time
import uuid


class APIError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class SamplingRequest:
    """The validated settings of one request (chat or completion)."""
    model: str
    prompt: str
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    n: int
    seed: int | None
    stop: tuple[str, ...]
    repetition_penalty: float
    logprobs: int | None  # None = off, else number of top alternatives
    stream: bool
    echo: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


_MISSING = object()


def _get(body: dict, key: str, types, default=_MISSING, *, nullable=True):
    value = body.get(key, _MISSING)
    if value is _MISSING or (value is None and nullable):
        if default is _MISSING:
            raise APIError(422, f"'{key}' is a required field", param=key, code="missing_required_field")
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(422, f"'{key}' must be of type {_names(types)}, got a boolean", param=key,
                       code="invalid_type")
    if not isinstance(value, types):
        raise APIError(422, f"'{key}' must be of type {_names(types)}, got {type(value).__name__}", param=key,
                       code="invalid_type")
    return value


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "integer", float: "number", str: "string", bool: "boolean", list: "array",
                        dict: "object"}.get(t, t.__name__) for t in types)


def _range(key, value, low=None, high=None, *, low_open=False):
    if low is not None and (value < low or (low_open and value == low)) or high is not None and value > high:
        bound = f"{'>' if low_open else '>='} {low}" if high is None else \
            f"in {'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"'{key}' must be {bound} (got {value})", param=key, code="invalid_value")


def _common(body: dict, *, chat: bool) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = _get(body, "model", str)
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, max_key, int, None)
    if max_tokens is not None:
        _range(max_key, max_tokens, 1)
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    _range("temperature", temperature, 0.0, 2.0)
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    _range("top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = _get(body, "top_k", int, 0)
    _range("top_k", top_k, 0)
    n = _get(body, "n", int, 1)
    _range("n", n, 1, 128)
    seed = _get(body, "seed", int, None)
    stop = _get(body, "stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings",
                       param="stop", code="invalid_value")
    penalty = float(_get(body, "repetition_penalty", (int, float), 1.0))
    _range("repetition_penalty", penalty, 0.0, None, low_open=True)
    stream = _get(body, "stream", bool, False)
    ignore_eos = _get(body, "ignore_eos", bool, False)  # vLLM's extension: decode exactly max_tokens
    options = _get(body, "stream_options", dict, {})
    for key in ("presence_penalty", "frequency_penalty"):
        value = _get(body, key, (int, float), 0.0)
        if value != 0:
            raise APIError(400, f"'{key}' is not supported by megaocto serve (use repetition_penalty)", param=key,
                           code="unsupported_parameter")
    return dict(model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, n=n,
                seed=seed, stop=stop, repetition_penalty=penalty, stream=stream,
                include_usage=bool(options.get("include_usage", False)), ignore_eos=ignore_eos)


def parse_completion(body: dict) -> tuple[SamplingRequest, list]:
    """(settings, prompts) of a ``/v1/completions`` body; prompts are strings or token-id lists."""
    common = _common(body, chat=False)
    prompt = _get(body, "prompt", (str, list))
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif prompt and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                            "token-id lists (non-empty)", param="prompt", code="invalid_value")
    logprobs = _get(body, "logprobs", int, None)
    if logprobs is not None:
        _range("logprobs", logprobs, 0, 20)
    echo = _get(body, "echo", bool, False)
    if echo and common["stream"]:
        raise APIError(400, "'echo' is not supported with 'stream'", param="echo", code="unsupported_parameter")
    if common["max_tokens"] is None:
        common["max_tokens"] = 16  # OpenAI's default for completions
    return SamplingRequest(prompt="", logprobs=logprobs, echo=echo, **common), prompts


def parse_chat(body: dict) -> tuple[SamplingRequest, list[dict]]:
    """(settings, messages) of a ``/v1/chat/completions`` body."""
    common = _common(body, chat=True)
    messages = _get(body, "messages", list)
    if not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages", code="invalid_value")
    clean = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(422, f"messages[{k}] must be an object", param=f"messages[{k}]", code="invalid_type")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{k}].role must be 'system', 'user' or 'assistant' (got {role!r})",
                           param=f"messages[{k}].role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts are meaningful here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{k}].content: only text parts are supported",
                               param=f"messages[{k}].content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(422, f"messages[{k}].content must be a string", param=f"messages[{k}].content",
                           code="invalid_type")
        clean.append({"role": role, "content": content})
    want_logprobs = _get(body, "logprobs", bool, False)
    top = _get(body, "top_logprobs", int, None)
    if top is not None:
        _range("top_logprobs", top, 0, 20)
        if not want_logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs",
                           code="invalid_value")
    logprobs = (top or 0) if want_logprobs else None
    return SamplingRequest(prompt="", logprobs=logprobs, **common), clean


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
