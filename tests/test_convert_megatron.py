"""bigcode Megatron-LM GPT checkpoint import (megaocto.convert.megatron).

The fixture builder below is the reference for the source layout: it writes, from a random megaocto model, the
files bigcode's Megatron-LM fork saves (megatron-octopack.md §1.11-1.12): ``iter_XXXXXXX|release/mp_rank_TT[_PPP]/
model_optim_rng.pt`` with a pickled ``argparse.Namespace`` (holding a Megatron enum from a module that is not
importable at load time), ``model.language_model.{embedding: {word_embeddings: {weight}, position_embeddings:
{weight}}, encoder: flat layer dict}``, vocab-parallel rows padded to a multiple of make_vocab_size_divisible_by*tp,
column-parallel query/QKV/h_to_4h rows, row-parallel dense/4h_to_h columns, MQA ``key_value`` replicated, and the
MHA ``query_key_value`` rows of each shard in Megatron's per-head order ``[np/tp, 3, hn]`` (version >= 2; version
0 = ``[3, np/tp, hn]``, 1.0 = ``[np/tp, hn, 3]``). Imports must reproduce the model's tensors bit-exactly and its
logits within 1e-5.
"""
from __future__ import annotations

import argparse
import collections
import enum
import os
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megaocto.config.model import ModelConfig, pad_vocab
from megaocto.convert.core import ConversionError, megaocto_logits_fn, read_megaocto_checkpoint
from megaocto.convert.megatron import (Opaque, convert_megatron, iter_megaocto_tensors, load_megatron_file,
                                       megatron_reference_logits, iter_megatron_full, model_config_from_args,
                                       open_source, validate_source)
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext

VOCAB, DIV = 1003, 8  # padded: 1008 at tp=1 and tp=2
TOL = dict(atol=1e-5, rtol=0.0)


# ------------------------------------------------------------------------------------------ reference model
def _reference(head_type: str, seed: int = 0, *, tied: bool = True, bias: bool = True
               ) -> tuple[ModelConfig, torch.nn.Module]:
    cfg = ModelConfig(family="bigcode", num_layers=4, hidden_size=32, num_attention_heads=4,
                      num_query_groups=1 if head_type == "multiquery" else 4, kv_channels=16, ffn_hidden_size=48,
                      vocab_size=VOCAB, make_vocab_size_divisible_by=DIV, seq_length=16,
                      max_position_embeddings=24, attention_dropout=0.0, hidden_dropout=0.0, tie_embeddings=tied,
                      add_qkv_bias=bias, add_bias_linear=bias)
    torch.manual_seed(seed)
    model = build_model(cfg, ParallelContext.single()).eval()
    with torch.no_grad():  # every tensor random (biases and LayerNorms too), so bit-exactness means something
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "layernorm.weight" in name else 0.0))
    return cfg, model


# ------------------------------------------------------------------------------------------ fixture builder
class _PositionEmbeddingType(enum.Enum):  # pickled as megatron.model.enums.PositionEmbeddingType
    rotary = 1
    absolute = 2
    alibi = 3


def _save_with_fake_megatron(obj: dict, path: str) -> None:
    """torch.save with the enum resolvable as megatron.model.enums.*, then make megatron unimportable again."""
    names = ["megatron", "megatron.model", "megatron.model.enums"]
    saved = {n: sys.modules.get(n) for n in names}
    enums = types.ModuleType("megatron.model.enums")
    enums.PositionEmbeddingType = _PositionEmbeddingType
    _PositionEmbeddingType.__module__ = "megatron.model.enums"
    _PositionEmbeddingType.__qualname__ = "PositionEmbeddingType"
    sys.modules.update({"megatron": types.ModuleType("megatron"), "megatron.model": types.ModuleType("megatron.model"),
                        "megatron.model.enums": enums})
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(obj, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _megatron_args(cfg: ModelConfig, *, tp: int, pp: int, head_type: str, **extra) -> argparse.Namespace:
    a = argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.head_dim, ffn_hidden_size=cfg.ffn_size, padded_vocab_size=pad_vocab(cfg.vocab_size, tp, DIV),
        make_vocab_size_divisible_by=DIV, max_position_embeddings=cfg.max_positions, seq_length=cfg.seq_length,
        attention_head_type=head_type, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, layernorm_epsilon=cfg.norm_epsilon, init_method_std=0.02,
        attention_dropout=0.1, hidden_dropout=0.1, bias_gelu_fusion=True, openai_gelu=False, swiglu=False,
        position_embedding_type=_PositionEmbeddingType.absolute, params_dtype=torch.float32,
        apply_layernorm_1p=False, untie_embeddings_and_output_weights=False, tokenizer_type="TokenizerFromFile",
        tokenizer_file="/data/tokenizer.json", iteration=7)
    for k, v in extra.items():
        setattr(a, k, v)
    return a


def _qkv_shard_in_version(shard: torch.Tensor, heads_local: int, d: int, version: float) -> torch.Tensor:
    """A ``[np/tp, 3, hn]``-ordered shard rewritten in an older checkpoint_version's row order."""
    rest = shard.shape[1:]
    if version >= 2.0:
        return shard
    per_head = shard.view(heads_local, 3, d, *rest)
    if version == 0:
        return per_head.transpose(0, 1).reshape(shard.shape).contiguous()  # [3, np, hn]
    return per_head.transpose(1, 2).reshape(shard.shape).contiguous()  # 1.0: [np, hn, 3]


def _megatron_layer(sd: dict, i: int, cfg: ModelConfig, tp: int, head_type: str, version: float,
                    layernorm_1p: bool) -> list[dict[str, torch.Tensor]]:
    """Per-TP-rank Megatron tensors of layer ``i`` (keys relative to the layer)."""
    pre = f"layers.{i}."
    heads, d = cfg.num_attention_heads, cfg.head_dim
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def rep(key: str, t: torch.Tensor | None) -> None:
        for r in ranks:
            if t is not None:  # None: the model has no such bias
                r[key] = t.clone()

    def split(key: str, t: torch.Tensor | None, dim: int) -> None:
        for r, part in zip(ranks, t.chunk(tp, dim=dim) if t is not None else []):
            r[key] = part.clone()

    sd = collections.defaultdict(lambda: None, sd)

    for ln in ("input_layernorm", "post_attention_layernorm"):
        rep(f"{ln}.weight", sd[pre + f"{ln}.weight"] - (1.0 if layernorm_1p else 0.0))
        rep(f"{ln}.bias", sd[pre + f"{ln}.bias"])
    if head_type == "multiquery":
        for p in ("weight", "bias"):
            split(f"self_attention.query.{p}", sd[pre + f"self_attention.query.{p}"], 0)
            rep(f"self_attention.key_value.{p}", sd[pre + f"self_attention.key_value.{p}"])
    else:
        for p in ("weight", "bias"):
            ours = sd[pre + f"self_attention.query_key_value.{p}"]  # [q; k; v], each [np*hn]
            if ours is None:
                continue
            rest = ours.shape[1:]
            per_head = ours.view(3, heads, d, *rest).transpose(0, 1).reshape(ours.shape)  # [np, 3, hn]
            for r, part in zip(ranks, per_head.chunk(tp, dim=0)):
                r[f"self_attention.query_key_value.{p}"] = _qkv_shard_in_version(part, heads // tp, d, version)
    split("self_attention.dense.weight", sd[pre + "self_attention.dense.weight"], 1)
    rep("self_attention.dense.bias", sd[pre + "self_attention.dense.bias"])
    split("mlp.dense_h_to_4h.weight", sd[pre + "mlp.dense_h_to_4h.weight"], 0)
    split("mlp.dense_h_to_4h.bias", sd[pre + "mlp.dense_h_to_4h.bias"], 0)
    split("mlp.dense_4h_to_h.weight", sd[pre + "mlp.dense_4h_to_h.weight"], 1)
    rep("mlp.dense_4h_to_h.bias", sd[pre + "mlp.dense_4h_to_h.bias"])
    return ranks


def build_megatron_checkpoint(root: str, cfg: ModelConfig, model: torch.nn.Module, *, tp: int, pp: int = 1,
                              head_type: str, iteration: int | str = 7, version: float = 3.0,
                              layernorm_1p: bool = False, tracker: bool = True, extra_lm: dict | None = None,
                              **arg_overrides) -> str:
    """Write ``model`` as a bigcode Megatron-LM GPT checkpoint under ``root``; returns the iteration directory."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = _megatron_args(cfg, tp=tp, pp=pp, head_type=head_type, apply_layernorm_1p=layernorm_1p,
                          untie_embeddings_and_output_weights=not cfg.tie_embeddings, **arg_overrides)
    padded = pad_vocab(cfg.vocab_size, tp, DIV)
    wte = sd["embedding.word_embeddings.weight"]
    if wte.shape[0] < padded:
        wte = torch.cat([wte, torch.randn(padded - wte.shape[0], wte.shape[1])])
    wte = wte[:padded]
    out_w = None
    if not cfg.tie_embeddings:
        out_w = sd["output_layer.weight"]
        out_w = torch.cat([out_w, torch.randn(max(0, padded - out_w.shape[0]), out_w.shape[1])])[:padded]
    it_dir = os.path.join(root, "release" if iteration == "release" else f"iter_{int(iteration):07d}")
    per_stage = cfg.num_layers // pp
    layers = [_megatron_layer(sd, i, cfg, tp, head_type, version, layernorm_1p) for i in range(cfg.num_layers)]
    for p in range(pp):
        for t in range(tp):
            lm: dict = {}
            if p == 0:
                lm["embedding"] = {"word_embeddings": {"weight": wte.chunk(tp)[t].clone()},
                                   "position_embeddings": {"weight": sd["embedding.position_embeddings.weight"]}}
            enc: dict[str, torch.Tensor] = {}
            for local in range(per_stage):
                for k, v in layers[p * per_stage + local][t].items():
                    enc[f"layers.{local}.{k}"] = v
            model_dict: dict = {"language_model": lm}
            if p == pp - 1:
                enc["final_layernorm.weight"] = sd["final_layernorm.weight"] - (1.0 if layernorm_1p else 0.0)
                enc["final_layernorm.bias"] = sd["final_layernorm.bias"]
                if out_w is not None:
                    lm["output_layer"] = {"weight": out_w.chunk(tp)[t].clone()}
                elif pp > 1:
                    model_dict["word_embeddings_for_head"] = {"weight": wte.chunk(tp)[t].clone()}
            lm["encoder"] = enc
            lm.update(extra_lm or {})
            state = {"args": args, "checkpoint_version": version,
                     "iteration": 0 if iteration == "release" else iteration,
                     "model": model_dict,
                     "optimizer": {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}},
                     "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 10},
                     "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                                    "torch_rng_state": torch.get_rng_state()}]}
            rank = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
            _save_with_fake_megatron(state, os.path.join(it_dir, rank, "model_optim_rng.pt"))
    if tracker:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(f"{iteration}\n")
    return it_dir


def _expected(model: torch.nn.Module, vocab: int) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in sd:
            sd[name] = sd[name][:vocab]
    return sd


# ------------------------------------------------------------------------------------------ mapping (no writer)
@pytest.mark.parametrize("head_type,tp,pp,version,one_p,variant", [
    ("multiquery", 1, 1, 3.0, False, "tied"),
    ("multihead", 2, 1, 3.0, False, "untied"),
    ("multihead", 2, 1, 0, False, "tied"),
    ("multihead", 1, 2, 1.0, True, "no_bias"),
    ("multiquery", 2, 2, 3.0, True, "untied"),
])
def test_mapping_is_bit_exact_and_reference_forward_matches(tmp_path, head_type, tp, pp, version, one_p, variant):
    cfg, model = _reference(head_type, tied=variant != "untied", bias=variant != "no_bias")
    build_megatron_checkpoint(str(tmp_path), cfg, model, tp=tp, pp=pp, head_type=head_type, version=version,
                              layernorm_1p=one_p, disable_bias_linear=variant == "no_bias")
    src = open_source(str(tmp_path))
    assert (src.tp, src.pp, src.iteration, src.head_type) == (tp, pp, 7, head_type)
    got_cfg = model_config_from_args(src, vocab_size=VOCAB)
    for f in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim", "ffn_size",
              "vocab_size", "max_positions", "activation", "make_vocab_size_divisible_by", "tie_embeddings",
              "add_qkv_bias", "add_bias_linear"):
        assert getattr(got_cfg, f) == getattr(cfg, f), f
    validate_source(src, got_cfg)
    got = dict(iter_megaocto_tensors(src, got_cfg))
    want = _expected(model, VOCAB)
    assert list(got) == list(want)  # every parameter once, in the model's order
    for k, v in want.items():
        if one_p and "layernorm.weight" in k:  # stored as gamma - 1: exact up to one fp32 rounding
            torch.testing.assert_close(got[k], v, atol=1e-7, rtol=0)
        else:
            assert torch.equal(got[k], v), k
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    ref = megatron_reference_logits(iter_megatron_full(src, got_cfg), got_cfg, ids, layernorm_1p=one_p)
    with torch.no_grad():
        torch.testing.assert_close(ref[..., :VOCAB], model(ids)[..., :VOCAB], **TOL)


def test_restricted_unpickler_runs_nothing_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "model_optim_rng.pt")
    _save_with_fake_megatron({"args": argparse.Namespace(position_embedding_type=_PositionEmbeddingType.absolute,
                                                         evil=Evil()),
                              "model": {"w": torch.arange(4.0)}}, path)
    state = load_megatron_file(path)
    assert not marker.exists()
    assert isinstance(state["args"].evil, Opaque) and state["args"].evil.qualname == "system"
    pos = state["args"].position_embedding_type
    assert isinstance(pos, Opaque) and (pos.module, pos.qualname, pos.value) == (
        "megatron.model.enums", "PositionEmbeddingType", 2)
    assert torch.equal(state["model"]["w"], torch.arange(4.0))


# ------------------------------------------------------------------------------------------ end to end (writer)
def _tp2_logits_body(rank, world_size, output, ids, ref_logits):
    from megaocto.checkpoint import load_checkpoint
    pc = ParallelContext.init(tp=2)
    cfg, _ = read_megaocto_checkpoint(output)
    state, meta, iteration = load_checkpoint(output, pc)
    assert iteration == "release" and meta["tp"] == 2
    model = build_model(cfg, pc).eval()
    model.load_state_dict(state["model"])
    with torch.no_grad():
        local = model(ids)
    parts = [torch.empty_like(local) for _ in range(pc.tp)]
    dist.all_gather(parts, local.contiguous(), group=pc.tp_group)
    torch.testing.assert_close(torch.cat(parts, -1)[..., :VOCAB], ref_logits, **TOL)


def test_convert_mha_tp2_keeps_tp_and_runs_under_tp2(tmp_path):
    cfg, model = _reference("multihead", seed=1)
    build_megatron_checkpoint(str(tmp_path / "meg"), cfg, model, tp=2, head_type="multihead", iteration=1200)
    out = str(tmp_path / "out")
    result = convert_megatron(str(tmp_path / "meg"), out, verify=True, vocab_size=VOCAB, progress=False)
    assert result.max_abs_logit_diff is not None and result.max_abs_logit_diff <= 1e-5
    got_cfg, tensors = read_megaocto_checkpoint(out, trim_vocab=True)
    assert got_cfg.vocab_size == VOCAB and got_cfg.num_query_groups == 4
    want = _expected(model, VOCAB)
    got = dict(tensors)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_logits = model(ids)[..., :VOCAB]
    run_distributed(_tp2_logits_body, 2, out, ids, ref_logits)


def test_convert_mqa_pp2_release_to_tp1_keeps_padded_vocab(tmp_path, capsys):
    cfg, model = _reference("multiquery", seed=2)
    build_megatron_checkpoint(str(tmp_path / "meg"), cfg, model, tp=2, pp=2, head_type="multiquery",
                              iteration="release")
    out = str(tmp_path / "out")
    result = convert_megatron(str(tmp_path / "meg"), out, tp=1, verify=True, progress=True)
    assert "keeping the padded vocabulary (1008 rows)" in capsys.readouterr().err  # notes only without --quiet
    assert result.max_abs_logit_diff <= 1e-5
    got_cfg, tensors = read_megaocto_checkpoint(out)
    assert got_cfg.vocab_size == 1008 and got_cfg.is_mqa
    got = dict(tensors)
    for k, v in model.state_dict().items():  # padded rows included (same padding at tp=1 and tp=2 here)
        assert torch.equal(got[k], v), k
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(megaocto_logits_fn(got_cfg, got)(ids)[..., :VOCAB], model(ids)[..., :VOCAB],
                                   **TOL)


# ------------------------------------------------------------------------------------------ errors
def _break(kind: str, root: str) -> None:
    if kind == "empty":
        os.makedirs(root)
        return
    cfg, model = _reference("multiquery")
    overrides = {"unknown_head_type": {"attention_head_type": "grouped"}, "shape": {"ffn_hidden_size": 64},
                 "swiglu": {"swiglu": True}, "not_gpt": {"extra_lm": {"pooler": {"dense.weight": torch.zeros(2, 2)}}},
                 }.get(kind, {})
    it_dir = build_megatron_checkpoint(root, cfg, model, tp=2, head_type="multiquery", **overrides)
    if kind == "missing_rank":
        os.remove(os.path.join(it_dir, "mp_rank_01", "model_optim_rng.pt"))
        os.rmdir(os.path.join(it_dir, "mp_rank_01"))
    if kind == "bad_tracker":
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("99\n")


@pytest.mark.parametrize("kind,message", [
    ("empty", "no Megatron checkpoint there"),
    ("missing_rank", "missing rank files for tp=2, pp=1: mp_rank_01"),
    ("unknown_head_type", "unknown args.attention_head_type 'grouped'"),
    ("not_gpt", "only Megatron GPT models can be imported"),
    ("shape", "mlp.dense_h_to_4h.weight has shape (24, 32), expected (32, 32)"),
    ("swiglu", "SwiGLU MLP (args.swiglu)"),
    ("bad_tracker", "iter_0000099: missing"),
])
def test_errors_are_clear_and_nothing_is_written(tmp_path, kind, message):
    root, out = str(tmp_path / "meg"), str(tmp_path / "out")
    _break(kind, root)
    with pytest.raises(ConversionError) as e:
        convert_megatron(root, out, progress=False)
    assert message in str(e.value)
    assert not os.path.exists(out)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out")] == []


def test_cli_from_megatron_bf16_with_vocab_size(tmp_path, capsys):
    from megaocto.cli import main

    cfg, model = _reference("multiquery", seed=4)
    build_megatron_checkpoint(str(tmp_path / "meg"), cfg, model, tp=1, head_type="multiquery", iteration=30)
    out = str(tmp_path / "out")
    rc = main(["convert", "from-megatron", "--load", str(tmp_path / "meg"), "--output", out, "--tp", "2",
               "--vocab-size", str(VOCAB), "--dtype", "bf16", "--iteration", "30", "--verify", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    label = "max abs logit difference (Megatron reference vs megaocto tp=2 (2 gloo processes, one rank file each)):"
    diff = float(captured.out.split(label)[1].split()[0])
    assert 0 < diff < 0.5  # bf16 rounding of the weights, nothing structural
    got_cfg, tensors = read_megaocto_checkpoint(out, trim_vocab=True)
    assert got_cfg.vocab_size == VOCAB
    for k, v in tensors:
        assert v.dtype == torch.bfloat16 and torch.equal(v, _expected(model, VOCAB)[k].to(torch.bfloat16)), k
    rc = main(["convert", "from-megatron", "--load", str(tmp_path / "meg"), "--output", out])
    assert rc == 2 and "already exists" in capsys.readouterr().err
