"""`megaocto serve`: a real server process on a tiny checkpoint driven by the official `openai` client
(completions, chat, logprobs, streaming == non-streaming, n > 1 + seeds, stop strings, concurrent requests batched
into one decode batch with the same results as alone, OpenAI-style 400/404/422 errors with the server alive after,
context-length refusal, clean SIGTERM exit), tp=2 under torchrun giving tp=1's tokens; the batch engine in-process
(greedy rows equal megaocto.generation.generate, a seeded row is independent of its batch mates, repetition
penalty rule, stop-prefix hold-back, chat templates).
"""
import concurrent.futures
import json
import os
import shutil
import sys
import urllib.error
import urllib.request

import pytest
import torch

from serving_utils import ServerProcess, free_port, tiny_checkpoint

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def server(ckpt):
    # a long batch wait so that the concurrent-request test reliably lands in one batch
    s = ServerProcess(ckpt[0], "--max-batch", "8", "--batch-wait-ms", "300", "--chat-template", "magicoder")
    yield s
    s.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


PROMPT = "def add_3(a, b):"


def test_models_and_completion_with_logprobs(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == 256
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    ch = r.choices[0]
    assert ch.finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens == len(_tok().encode(PROMPT))
    fixed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, extra_body={"ignore_eos": True})
    assert fixed.usage.completion_tokens == 20 and fixed.choices[0].finish_reason == "length"
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    # chat logprobs (a list, no key collisions between tokens that print alike): under greedy decoding the chosen
    # token is the most likely, so it heads its own top list
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Add."}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(c.top_logprobs) == 4 for c in content)
    for c in content:
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6) and c.top_logprobs[0].token == c.token
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)


def test_streaming_equals_non_streaming(client):
    for chat in (False, True):
        kw = dict(model="tiny", max_tokens=12, temperature=0.9, seed=7)
        if chat:
            full = client.chat.completions.create(messages=[{"role": "user", "content": "add"}], **kw)
            parts = list(client.chat.completions.create(messages=[{"role": "user", "content": "add"}], stream=True,
                                                        **kw))
            text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
            assert full.choices[0].message.content == text and parts[0].choices[0].delta.role == "assistant"
        else:
            full = client.completions.create(prompt=PROMPT, **kw)
            parts = list(client.completions.create(prompt=PROMPT, stream=True, **kw))
            text = "".join(p.choices[0].text for p in parts if p.choices)
            assert full.choices[0].text == text
        assert len(parts) >= 2
        assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == full.choices[0].finish_reason


def test_n_seed_and_stop(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, n=3, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1, 2]
    assert len(set(texts)) >= 2  # the samples of one request differ
    assert [c.text for c in client.completions.create(**{**kw, "seed": 12}).choices] != texts
    # a stop string taken from the unstopped greedy text cuts it there, finish_reason "stop"
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(p.choices[0].text for p in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], stream=True) if p.choices)
    assert streamed == cut.text


def test_concurrent_requests_share_a_batch(client, server):
    prompts = [f"def add_{i}(a, b):" for i in range(6)]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=8 + i, temperature=0).choices[0].text
             for i, p in enumerate(prompts)]
    before = server.health()
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(client.completions.create, model="tiny", prompt=p, max_tokens=8 + i, temperature=0)
                for i, p in enumerate(prompts)]
        together = [f.result().choices[0].text for f in futs]
    after = server.health()
    assert together == alone
    assert after["rows"] - before["rows"] == 6 and after["batches"] - before["batches"] < 6, (before, after)
    assert after["max_rows_in_batch"] >= 2


def _post(server, path, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_server_lives(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model="tiny", prompt="x " * 100, max_tokens=200)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 300}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="alternate"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", extra_body={"max_tokens": "ten"})
    status, body = _post(server, "/completions", {"model": "tiny"})
    assert status == 422 and body["error"]["param"] == "prompt" and body["error"]["type"] == "invalid_request_error"
    status, body = _post(server, "/completions", b"{not json", raw=True)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(server, "/nowhere", {})
    assert status == 404 and "no route" in body["error"]["message"]
    status, body = _post(server, "/completions", {"model": "tiny", "prompt": [10 ** 6]})
    assert status == 400 and "token id" in body["error"]["message"]
    # still serving
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


def test_sigterm_stops_cleanly(ckpt):
    s = ServerProcess(ckpt[0])
    try:
        client = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices
        assert s.terminate() == 0
        assert "megaocto serve: stopped" in s.output()
    finally:
        s.kill()


def test_tp2_under_torchrun_equals_tp1(ckpt, client, tmp_path):
    from megaocto.cli import main

    load, _ = ckpt
    tp2 = str(tmp_path / "tp2")
    assert main(["convert", "reshard", "--load", load, "--tp", "2", "--output", tp2, "--quiet"]) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [torchrun if os.path.exists(torchrun) else shutil.which("torchrun"), "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "megaocto.cli"]
    s = ServerProcess(tp2, "--tokenizer", ckpt[1], launcher=launcher)
    try:
        c2 = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=120)
        kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert c2.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
        kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.8, seed=3, n=2)
        assert [c.text for c in c2.completions.create(**kw).choices] == \
            [c.text for c in client.completions.create(**kw).choices]
        s.terminate()  # torchrun forwards SIGTERM to both ranks (its own exit code reports the signal)
        out = s.output()
        assert "megaocto serve: stopped (rank 0)" in out and "megaocto serve: rank 1 stopped" in out, out
        assert "Exception in thread" not in out and "megaocto/serving" not in out, out  # torchrun's own traceback only
    finally:
        s.kill()


# ------------------------------------------------------------------------------------------ in-process engine
_TOK = {}


def _tok():
    return _TOK["t"]


@pytest.fixture(scope="module", autouse=True)
def _load_tok(ckpt):
    from megaocto.generation import load_tokenizer
    _TOK["t"] = load_tokenizer(ckpt[1])


@pytest.mark.parametrize("family", ["tiny-bigcode", "tiny-glm2"])
def test_engine_rows_equal_generate_and_are_independent(family):
    from megaocto.config.model import ModelConfig
    from megaocto.generation import GenerationConfig, generate
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext
    from megaocto.serving import Engine, RowRequest

    tok = _tok()
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset(family, init_method_std=0.2, vocab_size=tok.vocab_size),
                        ParallelContext.single()).eval()
    prompts = [tok.encode(p) for p in ("def add_1(a, b):", "print(", "return a + b * 7\n\nprint(add_7(1, 2))")]
    engine = Engine(model, tok)
    rows = [RowRequest(prompt=p, max_new_tokens=5 + 2 * i) for i, p in enumerate(prompts)]
    got = engine.run(rows)
    ref = generate(model, prompts, GenerationConfig(max_new_tokens=9))
    for i, r in enumerate(got):
        assert [t.token for t in r.tokens] == ref[i][:5 + 2 * i] and r.finish_reason == "length"
    sampled = RowRequest(prompt=prompts[0], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5,
                         repetition_penalty=1.3)
    alone = engine.run([sampled])[0]
    mixed = engine.run([rows[2], sampled, RowRequest(prompt=prompts[1], max_new_tokens=3, temperature=0.7, seed=1)])
    assert [t.token for t in mixed[1].tokens] == [t.token for t in alone.tokens] and alone.text == mixed[1].text


def test_repetition_penalty_and_hold_back():
    from megaocto.serving.engine import _held_back, apply_repetition_penalty

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5] and logits.tolist() == [2.0, -2.0, 1.0, 0.5]
    assert _held_back("abc```", ["````x"]) == 3 and _held_back("abc", ["zz"]) == 0
    assert _held_back("ab\ufffd", []) == 1 and _held_back("a\n@", ["\n@@"]) == 2


def test_chat_templates():
    from megaocto.data.formats import magicoder_prompt
    from megaocto.serving.templates import TemplateError, render_chat, template_from_metadata

    msgs = [{"role": "user", "content": "Write f."}]
    assert render_chat(msgs, "magicoder") == magicoder_prompt("Write f.")
    assert render_chat(msgs, "octocoder") == "Question: Write f.\n\nAnswer:"
    multi = [{"role": "system", "content": "S"}, *msgs, {"role": "assistant", "content": "A"},
             {"role": "user", "content": "Q2"}]
    assert render_chat(multi, "octocoder") == "S\n\nQuestion: Write f.\n\nAnswer: A\n\nQuestion: Q2\n\nAnswer:"
    assert render_chat(multi, "magicoder") == "S\n\n@@ Instruction\nWrite f.\n\n@@ Response\nA\n\n@@ Instruction\nQ2" \
                                              "\n\n@@ Response\n"
    with pytest.raises(TemplateError, match="last message"):
        render_chat(msgs + [{"role": "assistant", "content": "A"}], "magicoder")
    assert template_from_metadata({"config": {"data": {"format": "instruction-response"}}}) == "magicoder"
    assert template_from_metadata({"chat_template": "octocoder"}) == "octocoder"
    assert template_from_metadata({}) == "plain"
