"""Generation: KV-cached decoding equals full recomputation (logits ≤ 1e-5 at every step, same tokens) for bigcode
MQA, bigcode MHA and glm2 GQA; left-padded batches equal per-prompt runs; tp=2 (with sequence parallelism on the
context) gives tp=1's tokens on both ranks, also from a tp=2 release checkpoint; seeded sampling, top-k/top-p edge
cases and ties, stop strings/eos, rows stopping early and independently, per-row position limit, greedy samples
decoded once, sentencepiece completions keep their leading space, the eval hook decodes through generate_text;
greedy tokens equal transformers' GPTBigCode generate; `megaocto generate` on a checkpoint written by
`megaocto train` (mmap model-only load, --stop cuts, option validation).

Models use init std 0.2 so that untrained greedy decoding does not collapse to one repeated token (asserted).
"""
import dataclasses
import io
import json
import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from hf_reference import gpt_bigcode_twin
from megaocto.config.base import ConfigError
from megaocto.config.model import ModelConfig
from megaocto.generation import (GenerationConfig, KVCache, filter_logits, generate, generate_text,
                                 load_checkpoint_model, sample_next, truncate_at_stop)
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext

V = 1000
FAMILIES = {"bigcode-mqa": ("tiny-bigcode", {}), "bigcode-mha": ("tiny-bigcode", {"num_query_groups": 4}),
            "glm2-gqa": ("tiny-glm2", {})}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [11, 12], [100, 200, 300, 400]]


def _model(kind, pc=None, seed=0):
    name, overrides = FAMILIES[kind]
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset(name, init_method_std=0.2, **overrides),
                       pc or ParallelContext.single()).eval()


def _diverse(outputs):
    """No output is one repeated token and together they use several distinct tokens."""
    return all(len(set(o)) >= 2 for o in outputs) and len({t for o in outputs for t in o}) >= 6


# ------------------------------------------------------------------------------------------ cache correctness
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_cached_logits_equal_full_forward_and_tokens_match(kind):
    model = _model(kind)
    lengths = [len(p) for p in PROMPTS]
    longest, steps = max(lengths), 6
    pad = torch.tensor([longest - n for n in lengths])
    ids = torch.zeros(len(PROMPTS), longest, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, pad[i]:] = torch.tensor(p)
    follow = torch.randint(0, V, (len(PROMPTS), steps), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(model, len(PROMPTS), longest + steps, pad_lengths=pad, all_logits=True)
    assert cache.k[0].shape == (3, 1 if kind == "bigcode-mqa" else model.layers[0].self_attention.local_groups,
                                longest + steps, model.cfg.head_dim)
    with torch.no_grad():
        step_logits = [model(ids, kv_cache=cache)]  # prefill
        for t in range(steps):
            step_logits.append(model(follow[:, t:t + 1], kv_cache=cache))
        cached = torch.cat(step_logits, dim=1)  # [b, longest + steps, V]
        for i, p in enumerate(PROMPTS):
            full = model(torch.cat([torch.tensor(p), follow[i]])[None])[0]  # the row alone, no padding
            torch.testing.assert_close(cached[i, pad[i]:], full, atol=1e-5, rtol=0)
        # the default cache computes the LM head for the last position of each row only
        last = KVCache.for_model(model, len(PROMPTS), longest + 1, pad_lengths=pad)
        head = model(ids, kv_cache=last)
        assert head.shape == (len(PROMPTS), 1, cached.shape[-1])
        torch.testing.assert_close(head[:, 0], cached[:, longest - 1], atol=1e-5, rtol=0)
    gen = GenerationConfig(max_new_tokens=12)
    with_cache = generate(model, PROMPTS, gen)
    assert with_cache == generate(model, PROMPTS, gen, use_cache=False)
    assert _diverse(with_cache) and all(len(o) == 12 for o in with_cache)


@pytest.mark.parametrize("kind", ["bigcode-mqa", "glm2-gqa"])
def test_left_padded_batch_equals_per_prompt_runs(kind):
    model = _model(kind, seed=1)
    gen = GenerationConfig(max_new_tokens=10)
    alone = [generate(model, [p], gen)[0] for p in PROMPTS]
    assert _diverse(alone)
    assert generate(model, PROMPTS, gen) == alone
    assert generate(model, PROMPTS, gen, use_cache=False) == alone
    assert generate(model, PROMPTS, gen, batch_size=2) == alone


def test_generation_restores_training_mode_and_checks_lengths():
    model = _model("bigcode-mqa").train()
    generate(model, PROMPTS[:1], GenerationConfig(max_new_tokens=2))
    assert model.training
    # bigcode's learned position table (64 rows) bounds prompt + new tokens, per row: the short prompt of the
    # batch still gets its max_new_tokens and decodes as it would alone
    long_prompt, short_prompt = list(range(1, 61)), PROMPTS[0]
    gen = GenerationConfig(max_new_tokens=10)
    alone = generate(model, [short_prompt], gen)[0]
    assert len(alone) == 10
    for use_cache in (True, False):
        out = generate(model, [long_prompt, short_prompt], gen, use_cache=use_cache)
        assert len(out[0]) == 4 and out[0] == generate(model, [long_prompt], gen)[0]
        assert out[1] == alone, use_cache
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [list(range(1, 70))], GenerationConfig(max_new_tokens=1))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], GenerationConfig(max_new_tokens=1))
    cache = KVCache.for_model(model, 1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="KVCache is full"):
        model(torch.ones(1, 5, dtype=torch.long), kv_cache=cache)


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_seeded_reproducible_and_greedy_edge_cases():
    model = _model("glm2-gqa")
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8))
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=11, num_samples=2)
    first = generate(model, PROMPTS, sampled)
    assert len(first) == 6 and first == generate(model, PROMPTS, sampled)
    assert first != generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=1.0, seed=12,
                                                               num_samples=2))
    assert first[0] != first[1]  # two samples of one prompt differ
    assert generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=0.7, top_k=1, seed=5)) == greedy
    assert generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=5)) == greedy


def test_top_k_1_and_tiny_top_p_are_greedy_under_ties():
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 1.0, 1.0, 1.0]])
    kept = lambda out: (out > float("-inf")).int().tolist()  # noqa: E731
    assert kept(filter_logits(tied, top_k=1)) == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert kept(filter_logits(tied, top_k=2)) == [[0, 1, 1, 0], [1, 1, 0, 0]]  # exactly k, lowest ids first
    assert kept(filter_logits(tied, top_p=1e-6)) == [[0, 1, 0, 0], [1, 0, 0, 0]]
    g = torch.Generator().manual_seed(0)
    greedy = sample_next(tied, temperature=0.0).tolist()
    assert greedy == [1, 0]
    for _ in range(20):
        assert sample_next(tied, temperature=1.0, top_k=1, generator=g).tolist() == greedy
        assert sample_next(tied, temperature=1.0, top_p=1e-6, generator=g).tolist() == greedy


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: (out > float("-inf")).int().tolist()[0]  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [1, 1, 0, 0]
    assert kept(filter_logits(logits, top_p=0.5)) == [1, 0, 0, 0]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_p=0.6)) == [1, 1, 0, 0]
    assert kept(filter_logits(logits, top_p=0.9)) == [1, 1, 1, 0]
    assert kept(filter_logits(logits[:, [3, 2, 1, 0]], top_p=0.6)) == [0, 0, 1, 1]  # order-independent
    assert sample_next(logits, temperature=0.0).tolist() == [0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature=1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}


# ------------------------------------------------------------------------------------------ stops
class _LetterTokenizer:
    """id i <-> letter chr(97 + i % 26); eod 999 decodes to '|'."""
    eod = 999
    vocab_size = V

    def encode(self, text):
        return [ord(c) - 97 for c in text]

    def decode(self, ids):
        return "".join("|" if i == self.eod else chr(97 + i % 26) for i in ids)


def test_stop_strings_and_eos_cut_the_output():
    assert truncate_at_stop("abcXdefYg", ["Y", "X"]) == "abc"
    assert truncate_at_stop("abc", ["Z"]) == "abc"
    model, tok = _model("bigcode-mqa", seed=2), _LetterTokenizer()
    full = generate(model, [tok.encode("hello")], GenerationConfig(max_new_tokens=16))[0]
    text = tok.decode(full)
    stop = text[5:7]
    expected = text[:text.index(stop)]
    got = generate_text(model, tok, ["hello"], GenerationConfig(max_new_tokens=16, stop=(stop, "@@")))
    assert got == [expected]
    # token-level: eos and a token stop sequence cut before themselves
    k = 6
    assert generate(model, [tok.encode("hello")], GenerationConfig(max_new_tokens=16, eos_id=full[k]))[0] == \
        full[:full.index(full[k])]
    seq = tuple(full[3:5])
    cut = generate(model, [tok.encode("hello")], GenerationConfig(max_new_tokens=16, stop=(seq,)))[0]
    assert tuple(cut[-2:]) != seq and len(cut) <= 3 and cut == full[:len(cut)]
    with pytest.raises(ValueError, match="not one string"):
        GenerationConfig(max_new_tokens=1, stop="\n")


class _ForwardSpy:
    """Counts model forwards and records their input shapes (a forward hook)."""

    def __init__(self, model):
        self.shapes = []
        model.register_forward_hook(lambda _m, args, _out: self.shapes.append(tuple(args[0].shape)))

    @property
    def calls(self):
        return len(self.shapes)


@pytest.mark.parametrize("use_cache", [True, False])
def test_rows_stop_early_and_independently(use_cache):
    model = _model("bigcode-mqa", seed=2)
    prompts = PROMPTS[:2]
    gen = GenerationConfig(max_new_tokens=8)
    full = generate(model, prompts, gen, use_cache=use_cache)
    assert all(len(o) == 8 for o in full)
    spy = _ForwardSpy(model)
    # row 0 asks to stop after 2 tokens, row 1 never: row 1 still gets all 8, row 0 only its 2
    seen = []

    def stop_after_two(row, toks):
        seen.append((row, len(toks)))
        return row == 0 and len(toks) == 2

    out = generate(model, prompts, gen, use_cache=use_cache, stop_fn=stop_after_two)
    assert out == [full[0][:2], full[1]]
    # one batch throughout: prefill + 7 decode steps of both rows (the 8th token needs no forward)
    longest = max(len(p) for p in prompts)
    assert spy.shapes == ([(2, longest)] + [(2, 1)] * 7 if use_cache else [(2, longest + k) for k in range(8)])
    assert sorted(seen) == [(0, 1), (0, 2)] + [(1, k) for k in range(1, 9)]  # no calls for a finished row
    # every row stopping after 3 tokens ends the batch: prefill + 2 decode steps
    spy.shapes.clear()
    out = generate(model, prompts, gen, use_cache=use_cache, stop_fn=lambda row, toks: len(toks) == 3)
    assert out == [f[:3] for f in full] and spy.calls == 3
    # eos in row 1 at step 3 (the token it produces there): row 1 is cut, row 0 runs to max_new_tokens
    eos = full[1][3]
    if eos not in full[0] and eos not in full[1][:3]:
        spy.shapes.clear()
        out = generate(model, prompts, dataclasses.replace(gen, eos_id=eos), use_cache=use_cache)
        assert out == [full[0], full[1][:3]] and spy.calls == 8
    # all rows hitting a token stop sequence ends the batch early
    spy.shapes.clear()
    out = generate(model, prompts, dataclasses.replace(gen, stop=(tuple(full[0][1:3]), tuple(full[1][1:3]))),
                   use_cache=use_cache)
    assert out == [full[0][:1], full[1][:1]] and spy.calls == 3


def test_greedy_samples_decoded_once_and_prompts_sorted_by_length():
    model = _model("glm2-gqa", seed=3)
    single = generate(model, PROMPTS, GenerationConfig(max_new_tokens=4))
    spy = _ForwardSpy(model)
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=4, num_samples=3))
    assert out == [o for o in single for _ in range(3)]
    assert spy.shapes[0] == (len(PROMPTS), max(len(p) for p in PROMPTS))  # one row per prompt, not 3
    seen = []
    generate(model, PROMPTS, GenerationConfig(max_new_tokens=2, num_samples=2),
             stop_fn=lambda row, toks: seen.append(row) or False)
    assert sorted(set(seen)) == [0, 2, 4]  # a greedy prompt's rows are reported as its first sample
    # batch_size=2 over prompt lengths 7, 2, 4: sorted by length -> batches {2, 4} and {7}; order restored
    spy.shapes.clear()
    assert generate(model, PROMPTS, GenerationConfig(max_new_tokens=1), batch_size=2) == [o[:1] for o in single]
    assert spy.shapes == [(2, 4), (1, 7)]


def test_prefill_uses_the_models_attention_backend(monkeypatch):
    import megaocto.generation.kv_cache as kv

    model = _model("bigcode-mqa")
    backends = []
    original = kv.seam_attention

    def spy(*args, backend=None, **kw):
        backends.append(backend)
        return original(*args, **kw)  # run the torch path whatever was asked for

    monkeypatch.setattr(kv, "seam_attention", spy)
    monkeypatch.setattr(model, "ops", dataclasses.replace(model.ops, attention_backend="triton"))
    cache = KVCache.for_model(model, 1, 8)
    assert cache.attention_backend == "triton"
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0][:4]]), kv_cache=cache)
    assert backends and set(backends) == {"triton"}


# ------------------------------------------------------------------------------------------ sentencepiece
class _ScriptedModel(torch.nn.Module):
    """A stand-in model (uncached path only) that emits ``script`` after a prompt, then token 0 forever."""

    def __init__(self, prompt_len, script, vocab):
        super().__init__()
        self.cfg = ModelConfig.from_preset("tiny-glm2", vocab_size=vocab)
        self.pc = ParallelContext.single()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompt_len, self.script = prompt_len, script

    def forward(self, ids, segment_ids=None):
        b, s = ids.shape
        step = s - self.prompt_len
        logits = torch.zeros(b, s, self.cfg.vocab_size)
        logits[:, -1, self.script[step] if step < len(self.script) else 0] = 1.0
        return logits


def test_sentencepiece_completion_keeps_its_leading_space(tmp_path):
    import sentencepiece as spm

    from megaocto.data.tokenizer import load_tokenizer
    from megaocto.generation.generate import completion_text

    corpus = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "sp.model"), sp_special_tokens=())
    prompt = "    return"
    prompt_ids = tok.encode(prompt)
    whole = tok.encode("    return a + b")
    assert whole[:len(prompt_ids)] == prompt_ids
    script = whole[len(prompt_ids):]
    assert tok.decode(script) == "a + b"  # decoding the new tokens alone loses the space
    assert completion_text(tok, prompt_ids, script) == " a + b"
    model = _ScriptedModel(len(prompt_ids), script, tok.vocab_size)
    gen = GenerationConfig(max_new_tokens=len(script))
    got = generate_text(model, tok, [prompt], gen, use_cache=False)
    assert got == [" a + b"] and prompt + got[0] == "    return a + b"
    # a stop string that starts with the space is seen (and cut) too
    stopped = generate_text(model, tok, [prompt], dataclasses.replace(gen, stop=(" +",)), use_cache=False)
    assert stopped == [" a"]


def test_eval_hook_decodes_through_generate_text(tmp_path, monkeypatch):
    """The HumanEvalPack hook has no decoding loop of its own: its raw completions are generate_text's."""
    import megaocto.generation as generation
    from megaocto.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from megaocto.eval import humanevalpack as hep
    from megaocto.eval.hook import SampleSettings, generate_samples

    data = str(hep.SAMPLE_DIR)  # the 3 problems shipped in the package: no ../shared needed
    problems = hep.load_problems("python", data)[:2]
    tok_path = str(tmp_path / "tokenizer.json")
    train_bpe_tokenizer([p["prompt"] + p["canonical_solution"] for p in hep.load_problems("python", data)], 300,
                        tok_path)
    tok = load_tokenizer(tok_path)
    model = _model("bigcode-mqa", seed=5)
    calls = []
    real = generation.generate_text
    monkeypatch.setattr(generation, "generate_text", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    settings = SampleSettings(n_samples=2, temperature=0.0, max_new_tokens=6, batch_size=4)
    samples, raw = generate_samples(model, tok, "synthesize", "python", problems, settings)
    keep = model.cfg.max_positions - 6  # the prompt keeps what the new tokens leave of the position table
    assert len(calls) == 1 and calls[0]["max_prompt_tokens"] == keep
    prompts = [hep.build_prompt("synthesize", p, settings.template, lang="python") for p in problems]
    gen = GenerationConfig(max_new_tokens=6, eos_id=tok.eod, num_samples=2,
                           stop=tuple(hep.stop_words("synthesize", "python")))
    expected = real(model, tok, prompts, gen, max_prompt_tokens=keep)
    assert raw == [expected[0:2], expected[2:4]] and len(samples) == 2


# ------------------------------------------------------------------------------------------ tensor parallel
def _tp_body(rank, world_size, release_dir):
    pc = ParallelContext.init(tp=2, sequence_parallel=True)
    single = ParallelContext.single()
    configs = [GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=8, temperature=0.9, top_p=0.9,
                                                                    top_k=50, seed=3, num_samples=2)]
    for kind in ("bigcode-mqa", "glm2-gqa"):
        model, ref = _model(kind, pc), _model(kind, single)
        for gen in configs:
            for use_cache in (True, False):
                got = generate(model, PROMPTS, gen, pc, use_cache=use_cache)
                assert pc.sequence_parallel, "generate must restore sequence parallelism"
                both = [None, None]
                dist.all_gather_object(both, got, group=pc.tp_group)
                assert both[0] == both[1], (kind, gen, use_cache, "ranks disagree")
                assert got == generate(ref, PROMPTS, gen, single, use_cache=use_cache), (kind, gen, use_cache)
        assert _diverse(generate(ref, PROMPTS, configs[0], single))
    # a release checkpoint written at tp=2 (megaocto convert's writer) loads on both ranks and decodes the same
    loaded, cfg = load_checkpoint_model(release_dir, pc)
    assert cfg.family == "glm2" and pc.sequence_parallel
    assert generate(loaded, PROMPTS, configs[1], pc) == generate(_model("glm2-gqa", single), PROMPTS, configs[1])


def test_tp2_tokens_equal_tp1_on_both_ranks(tmp_path):
    from megaocto.convert.core import write_megaocto_checkpoint

    model = _model("glm2-gqa")
    release = write_megaocto_checkpoint(str(tmp_path / "release"), model.cfg, model.state_dict(), 2, progress=False)
    run_distributed(_tp_body, 2, release)


# ------------------------------------------------------------------------------------------ vs transformers
def test_bigcode_greedy_equals_transformers_generate():
    model = _model("bigcode-mqa", seed=4)
    hf = gpt_bigcode_twin(model, V, bos=V - 1, eos=V - 1, pad=V - 1)
    prompt = PROMPTS[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, num_beams=1,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    ref_new = ref[0, len(prompt):].tolist()
    got = generate(model, [prompt], GenerationConfig(max_new_tokens=16))[0]
    assert len(set(got)) >= 4 and got == ref_new


# ------------------------------------------------------------------------------------------ checkpoint + CLI
def _trained_checkpoint(tmp_path):
    from megaocto.config.loader import load_run_config
    from megaocto.data.tokenizer import train_bpe_tokenizer
    from megaocto.training.loop import train

    corpus = [f"def add_{i}(a, b):\n    return a + b * {i}\n" for i in range(200)]
    tok_path = str(tmp_path / "tok" / "tokenizer.json")
    train_bpe_tokenizer(corpus, 400, tok_path)
    save = str(tmp_path / "ckpt")
    cfg = load_run_config(None, [
        "--model.preset", "tiny-bigcode", "--model.seq_length", "32", "--data.kind", "synthetic",
        "--data.tokenizer", tok_path, "--train.iters", "2", "--train.micro_batch_size", "2",
        "--train.global_batch_size", "2", "--train.dtype", "fp32", "--logging.run_dir", str(tmp_path / "run"),
        "--logging.jsonl", "false", "--data.num_workers", "0", "--checkpoint.save", save])
    train(cfg, stream=io.StringIO())
    return save, tok_path


def test_generate_cli_on_trained_checkpoint(tmp_path, capsys, monkeypatch):
    from megaocto.cli import main

    save, tok_path = _trained_checkpoint(tmp_path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
    model, cfg = load_checkpoint_model(save)
    monkeypatch.setattr(torch, "load", real_load)
    assert loads and all(kw.get("mmap") and kw.get("weights_only") for kw in loads)  # model state only, mapped
    assert cfg.family == "bigcode" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    sd = torch.load(os.path.join(save, "iter_0000002", "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd["model"][k]), k
    with pytest.raises(ConfigError, match="megaocto convert reshard"):
        load_checkpoint_model(save, ParallelContext(tp=2, world_size=2))

    capsys.readouterr()
    rc = main(["generate", "--load", save, "--prompt", "def add_3(a, b):", "--max-new-tokens", "12",
               "--no-eos-stop"])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip(), out
    rc = main(["generate", "--load", save, "--tokenizer", tok_path, "--prompt", "def", "--prompt", "return",
               "--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.95", "--seed", "1", "--stop", "\\n",
               "--num-samples", "2", "--no-cache"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("### prompt") == 4, out
    rc = main(["generate", "--load", str(tmp_path / "nowhere"), "--prompt", "x"])
    assert rc == 2 and "not a directory" in capsys.readouterr().err

    # --stop really cuts: take a piece of the unstopped greedy completion as the stop string
    base = ["generate", "--load", save, "--prompt", "def add_3(a, b):", "--max-new-tokens", "12", "--no-eos-stop",
            "--jsonl"]
    assert main(base) == 0
    text = json.loads(capsys.readouterr().out)["completion"]
    assert len(text) >= 4, text
    stop = text[2:4]
    escaped = stop.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    assert main(base + ["--stop", escaped]) == 0
    cut = json.loads(capsys.readouterr().out)["completion"]
    assert cut == text[:text.index(stop)] and stop not in cut


def test_generate_cli_validates_before_loading(capsys, monkeypatch, tmp_path):
    from megaocto.cli import main

    nowhere = str(tmp_path / "nowhere")  # validation errors must come before the checkpoint is looked at
    for extra, message in ((["--stop", "\\x"], "--stop"), (["--temperature", "-1"], "--temperature"),
                           (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
                           (["--batch-size", "0"], "--batch-size")):
        assert main(["generate", "--load", nowhere, "--prompt", "x"] + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "not a directory" not in err and "Traceback" not in err, (extra, err)
    monkeypatch.setenv("RANK", "1")  # under torchrun only global rank 0 prints the error
    assert main(["generate", "--load", nowhere, "--prompt", "x"]) == 2
    assert capsys.readouterr().err == ""
