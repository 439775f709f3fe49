"""Helpers for the serving / instruct tests: a tiny checkpoint + tokenizer, and a real `megaocto serve` process.

The model is tiny-bigcode with init std 0.2 (so greedy decoding does not collapse to one repeated token), a
vocabulary equal to a small byte-level BPE trained on code, and 256 positions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [f"def add_{i}(a, b):\n    \"\"\"Add a and b.\"\"\"\n    return a + b * {i}\n\nprint(add_{i}(1, 2))\n"
          for i in range(120)] + ["Yes No yes no Is the answer correct? Write a function that adds numbers.\n"] * 5


def tiny_checkpoint(root: str, *, family: str = "tiny-bigcode", positions: int = 256, tp: int = 1,
                    data_format: str | None = None) -> tuple[str, str]:
    """``(checkpoint dir, tokenizer path)`` of a random tiny model saved as a megaocto checkpoint (tp=1)."""
    from megaocto import checkpoint as ckpt
    from megaocto.config.model import ModelConfig
    from megaocto.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    tok_path = os.path.join(root, "tok", "tokenizer.json")
    train_bpe_tokenizer(CORPUS, 400, tok_path)
    vocab = load_tokenizer(tok_path).vocab_size
    cfg = ModelConfig.from_preset(family, init_method_std=0.2, vocab_size=vocab, max_position_embeddings=positions,
                                  seq_length=positions)
    torch.manual_seed(0)
    pc = ParallelContext.single()
    model = build_model(cfg, pc)
    save = os.path.join(root, "tiny")
    data = {"tokenizer": tok_path}
    if data_format:
        data["format"] = data_format
    ckpt.save_checkpoint(save, 1, {"model": model.state_dict()}, {"config": {"model": cfg.to_dict(), "data": data}},
                         pc)
    return save, tok_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class ServerProcess:
    """A `megaocto serve` subprocess; ``url`` is its ``http://host:port/v1``."""

    def __init__(self, load: str, *extra: str, launcher: list[str] | None = None, timeout: float = 120.0):
        self.port = free_port()
        cmd = (launcher or [sys.executable, "-m", "megaocto.cli"]) + [
            "serve", "--load", load, "--port", str(self.port), "--model-name", "tiny", *extra]
        self.log = open(os.path.join(os.path.dirname(load), f"serve-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"megaocto serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"megaocto serve did not come up in {timeout}s:\n{self.output()}")
            time.sleep(0.2)

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
            return json.loads(r.read())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (to the main process only) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class ScriptedTeacher:
    """An OpenAI-compatible test server (http.server in a thread) answering ``/v1/chat/completions`` with
    ``answer(body, attempt) -> (status, json)``; records every request body. ``url`` is its ``.../v1``."""

    def __init__(self, answer, delay_s: float = 0.0):
        import http.server
        import threading

        self.requests: list[dict] = []
        self.attempts: dict = {}
        lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body, sort_keys=True)
                with lock:
                    outer.requests.append(body)
                    attempt = outer.attempts[key] = outer.attempts.get(key, -1) + 1
                if delay_s:
                    time.sleep(delay_s)
                status, payload = answer(body, attempt)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def chat_response(text: str, finish_reason: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted", "system_fingerprint": "fp_test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                                     "total_tokens": 2}}
