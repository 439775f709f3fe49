"""A small client for any OpenAI-compatible endpoint (vLLM, TGI, a hosted API, ``megaocto serve``).

``Teacher(url, model).chat(messages, **params)`` and ``.complete(prompt, **params)`` POST to
``{url}/chat/completions`` / ``{url}/completions`` and return the JSON answer. Transient failures — HTTP 429, 5xx,
timeouts, dropped connections — are retried ``max_retries`` times with exponential backoff (``backoff_s · 2^k``,
jittered, capped at ``max_backoff_s``; a ``Retry-After`` header wins); other HTTP errors raise at once.
The API key is read from the environment variable named by ``api_key_env`` (never passed on a command line).
"""
from __future__ import annotations

import dataclasses
import os
import random
import time

import httpx


class TeacherError(RuntimeError):
    """The endpoint refused the request (non-retryable), or every retry failed."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None):
        super().__init__(message)
        self.retryable, self.status = retryable, status


@dataclasses.dataclass
class TeacherConfig:
    """Where and how to reach the teacher.

    Attributes:
        url: base URL of the OpenAI-compatible API, e.g. http://host:8000/v1.
        model: model name sent in every request.
        api_key_env: environment variable holding the API key (unset or empty: no Authorization header).
        timeout_s: per-request timeout.
        max_retries: retries after a transient failure (429, 5xx, timeout, connection error).
        backoff_s: first backoff; doubles per retry.
        max_backoff_s: backoff cap.
    """
    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 600.0
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0


class Teacher:
    """Thread-safe (one shared connection pool)."""

    def __init__(self, cfg: TeacherConfig, *, max_connections: int = 64):
        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=cfg.url.rstrip("/"), headers=headers, timeout=cfg.timeout_s,
                                  limits=httpx.Limits(max_connections=max_connections))
        self.retries = 0  # retries done so far (all threads)

    def close(self) -> None:
        self._http.close()

    def chat(self, messages: list[dict], **params) -> dict:
        return self._post("/chat/completions", {"model": self.cfg.model, "messages": messages, **params})

    def complete(self, prompt, **params) -> dict:
        return self._post("/completions", {"model": self.cfg.model, "prompt": prompt, **params})

    def _post(self, path: str, body: dict) -> dict:
        attempt = 0
        while True:
            retry_after = None
            try:
                r = self._http.post(path, json=body)
                if r.status_code == 200:
                    return r.json()
                message = f"{self.cfg.url}{path}: HTTP {r.status_code}: {_error_text(r)}"
                if r.status_code != 429 and r.status_code < 500:
                    raise TeacherError(message, retryable=False, status=r.status_code)
                retry_after = _retry_after(r)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                message = f"{self.cfg.url}{path}: {type(e).__name__}: {e}"
            if attempt >= self.cfg.max_retries:
                raise TeacherError(f"{message} (gave up after {attempt} retries)", retryable=True)
            delay = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
            time.sleep(retry_after if retry_after is not None else delay)
            attempt += 1
            self.retries += 1


def _error_text(r: httpx.Response) -> str:
    try:
        err = r.json().get("error")
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        return r.text[:300]


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after")
    try:
        return min(float(value), 600.0) if value is not None else None
    except ValueError:
        return None
