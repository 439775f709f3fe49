"""`megaocto plan`: the layout planner recovers published layouts and prints its assumptions.

Published configurations checked (docs/plan.md says what the planner ranks first for each):
* StarCoder-15B pretraining: 64 nodes x 8 A100 80GB, tp=4 pp=4 SP, mbs 1, gbs 512, seq 8192, distributed optimizer
  (Megatron-LM examples/pretrain_bigcode_model.slurm; AWS EFA network, FI_PROVIDER=efa: 400 Gbit/s per node).
* OctoGeeX: CodeGeeX2-6B, tp_size 2, gbs 48, seq 8192 (octopack README), 80 GB GPUs.
* SantaCoderPack: SantaCoder 1.1B, tp=1 pp=1, seq 8192, mbs 2, gbs 64 (octopack pretraining_santacoderpack.sh).
* CodeLlama-7B / DeepSeek-Coder-6.7B / 33B finetuning on one node of 8 x 80 GB.
"""
from __future__ import annotations

import pytest

from megaocto.cli import main
from megaocto.config.model import ModelConfig
from megaocto.model.plan import GPUS, Hardware, Layout, estimate, format_plan, parse_memory, plan


def _plan(preset, gpu, gpus, seq, gbs, **kw):
    hw_kw = {k: kw.pop(k) for k in ("node_network_gbit", "memory_gib", "headroom") if k in kw}
    return plan(ModelConfig.from_preset(preset), Hardware(GPUS[gpu], gpus, **hw_kw), seq_len=seq,
                global_batch=gbs, model=preset, **kw)


def test_starcoder_pretraining_layout_tp4_pp4_is_recovered():
    # The cluster it ran on: 400 Gbit/s EFA per node, Megatron-LM of early 2023 reducing grads after the backward.
    p = _plan("starcoder-15b", "a100", 512, 8192, 512, node_network_gbit=400, overlap_grad_reduce=False)
    assert p.rank_of(tp=4, pp=4, dp=32, micro_batch=1, zero1=True) is not None  # fits
    best = p.feasible[0]
    known = p.feasible[p.rank_of(tp=4, pp=4, micro_batch=1) - 1]
    assert p.shape_rank(4, 4) <= 4
    assert known.step_s <= 1.05 * best.step_s
    assert best.layout.pp > 1  # on that network the model also prefers a pipeline
    # On a DGX SuperPOD network with overlapped grad reduction it still fits, but ZeRO-1 data parallelism without a
    # pipeline is estimated faster (docs/plan.md): the planner's honest disagreement.
    q = _plan("starcoder-15b", "a100", 512, 8192, 512)
    assert q.shape_rank(4, 4) is not None
    assert q.best().layout.pp == 1 and q.best().layout.zero1


def test_octopack_megatron_finetune_layout_tp4_pp4_is_near_the_top():
    # octopack finetune_starcoderbase.sh: 8 nodes x 8 A100, tp 4 pp 4, mbs 1, gbs 128 (seq 8192: the architecture's);
    # same network and Megatron generation as StarCoder's pretraining
    p = _plan("starcoder-15b", "a100", 64, 8192, 128, node_network_gbit=400, overlap_grad_reduce=False)
    known = p.by_shape()[p.shape_rank(4, 4) - 1]
    assert p.shape_rank(4, 4) <= 2 and known.step_s <= 1.05 * p.feasible[0].step_s


def test_octogeex_tp2_is_ranked_first():
    for gpu in ("a100", "h100"):
        p = _plan("codegeex2-6b", gpu, 8, 8192, 48)
        assert p.shape_rank(2, 1) == 1
        assert p.best(runnable_only=True).layout.tp == 2
        # CodeGeeX2's 2 K/V groups allow tp 1 or 2 only: tp 4 and 8 were skipped, and counted
        assert p.skipped["tp does not split the model's heads / K/V groups / MLP"] == 2
        assert {e.layout.tp for e in p.estimates} == {1, 2}


def test_santacoderpack_tp1_is_ranked_first():
    cfg = ModelConfig.from_preset("santacoder-1b", max_position_embeddings=8192)
    p = plan(cfg, Hardware(GPUS["a100"], 8), seq_len=8192, global_batch=64)
    assert p.best().layout.tp == 1 and p.best().layout.pp == 1
    assert p.rank_of(tp=1, pp=1, micro_batch=2) <= 10


@pytest.mark.parametrize("preset,gpu", [("codellama-7b", "a100"), ("deepseek-coder-6.7b", "h100")])
def test_7b_finetune_on_one_node_runs_without_pipeline(preset, gpu):
    p = _plan(preset, gpu, 8, 4096, 64)
    best = p.best(runnable_only=True)
    assert best.layout.pp == 1 and best.layout.tp in (1, 2)
    assert p.shape_rank(1, 1) <= 2 and p.shape_rank(2, 1) <= 2
    assert best.memory_gib <= 80 * 0.85


def test_33b_needs_more_than_one_node():
    p = _plan("deepseek-coder-33b", "h100", 8, 4096, 64)
    assert p.feasible == []
    text = format_plan(p)
    assert "no layout fits in memory" in text and "needs ~" in text
    p16 = _plan("deepseek-coder-33b", "h100", 16, 4096, 64, max_pp=1)
    best = p16.best()
    assert (best.layout.tp, best.layout.pp, best.layout.dp, best.layout.zero1) == (8, 1, 2, True)


def test_pp_layouts_are_planned_and_max_pp_1_excludes_them():
    p = _plan("starcoder-15b", "h100", 16, 2048, 32)
    assert any(e.layout.pp > 1 for e in p.feasible)
    text = format_plan(p, top=50)
    rows = [ln.split() for ln in text.splitlines()]
    pp_rows = [" ".join(r) for r in rows if len(r) >= 17 and r[0].isdigit() and r[1].isdigit() and r[2] != "1"]
    assert pp_rows  # pipeline layouts are trained by megaocto (parallel.pp) and ranked like the others
    pp_best = next(e for e in p.feasible if e.layout.pp > 1)
    assert f"--parallel.pp {pp_best.layout.pp}" in pp_best.layout.overrides()
    only = _plan("starcoder-15b", "h100", 16, 2048, 32, max_pp=1)
    assert only.estimates and all(e.layout.pp == 1 for e in only.estimates)
    assert only.skipped.get("pp > --max-pp 1", 0) > 0


def test_cost_model_directions():
    cfg = ModelConfig.from_preset("starcoder-15b")
    hw = Hardware(GPUS["a100"], 64)
    kw = dict(seq_len=8192, global_batch=64)

    def est(**fields):
        base = dict(tp=4, pp=1, dp=16, micro_batch=1, num_microbatches=4, zero1=False, recompute="none",
                    sequence_parallel=True)
        base.update(fields)
        return estimate(cfg, hw, Layout(**base), **kw)

    plain, z = est(), est(zero1=True)
    assert z.memory.total < plain.memory.total and z.memory.optimizer == pytest.approx(plain.memory.optimizer / 16)
    full, sel = est(recompute="full"), est(recompute="selective")
    assert plain.compute_s < sel.compute_s < full.compute_s
    assert full.memory.activations < plain.memory.activations
    assert est(tp=8, dp=8).tp_s > plain.tp_s > 0
    # DP over the network costs more than inside one node over NVLink (same layout, 4 vs 8 GPUs per node)
    lay = Layout(4, 1, 2, 1, 4, False, "none", True)
    in_node = estimate(cfg, Hardware(GPUS["a100"], 8), lay, seq_len=8192, global_batch=8, overlap_grad_reduce=False)
    over_net = estimate(cfg, Hardware(GPUS["a100"], 8, gpus_per_node=4), lay, seq_len=8192, global_batch=8,
                        overlap_grad_reduce=False)
    assert 0 < in_node.dp_s < over_net.dp_s
    overlapped = estimate(cfg, Hardware(GPUS["a100"], 8), lay, seq_len=8192, global_batch=8)
    assert overlapped.dp_s < in_node.dp_s
    # the pipeline bubble shrinks with more micro batches
    pp4 = estimate(cfg, hw, Layout(4, 4, 4, 1, 16, False, "none", True), **kw)
    pp4_few = estimate(cfg, hw, Layout(4, 4, 4, 4, 4, False, "none", True), **kw)
    assert 0 < pp4.pp_s < pp4_few.pp_s


def test_parse_memory():
    assert parse_memory("80GB") == 80 and parse_memory("141 GiB") == 141 and parse_memory("40") == 40
    for bad in ("eighty", "0GB", "80TB"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_cli_prints_assumptions_and_recommendation(capsys):
    rc = main(["plan", "--preset", "codegeex2-6b", "--gpus", "8", "--gpu", "h100", "--gpu-memory", "80GB",
               "--seq-length", "8192", "--global-batch", "48", "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    for needle in ("assumptions:", "989.4 TFLOP/s", "achievable 40% of peak", "NVLink 450 GB/s",
                   "3200 Gbit/s per node", "15% kept free", "(p-1)/m", "fit in memory",
                   "recommended for megaocto (rank 1): --parallel.tp 2"):
        assert needle in out, needle


@pytest.mark.parametrize("argv,msg", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpu-memory", "lots"], "GPU memory 'lots' not understood"),
    (["--seq-length", "16384"], "exceeds the model's 8192 learned positions"),
])
def test_cli_errors(capsys, argv, msg):
    base = ["plan", "--preset", "starcoder-15b", "--gpus", "8", "--global-batch", "8"]
    rc = main(base + argv)
    assert rc == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("name", ["octocoder-15b", "octogeex-6b", "santacoderpack-1b", "starcoder-15b-octopack",
                                  "octocoder-15b-lora"])
def test_launch_configs_use_the_planners_recommendation(capsys, name):
    """Each GPU run config names the `megaocto plan` command for its hardware and sets the layout it ranks first."""
    import re
    import shlex
    from pathlib import Path

    from megaocto.config.loader import load_run_config

    path = Path(__file__).resolve().parents[1] / "launch" / "configs" / f"{name}.yaml"
    text = path.read_text()
    m = re.search(r"`megaocto (plan [^`]+)`", text)
    assert m, f"{path} names no `megaocto plan ...` command"
    argv = shlex.split(m.group(1))
    assert argv[argv.index("--config") + 1] == f"launch/configs/{name}.yaml"
    argv[argv.index("--config") + 1] = str(path)
    assert main(argv) == 0
    rec = re.search(r"recommended for megaocto \(rank 1\): (.*?)  \(", capsys.readouterr().out).group(1)
    want = dict(zip(rec.split()[::2], rec.split()[1::2]))
    cfg = load_run_config(str(path))
    got = {"--parallel.tp": str(cfg.parallel.tp), "--train.micro_batch_size": str(cfg.train.micro_batch_size),
           "--train.zero1": str(cfg.train.zero1).lower(), "--train.recompute": cfg.train.recompute}
    if cfg.parallel.tp > 1:
        got["--parallel.sequence_parallel"] = str(cfg.parallel.sequence_parallel).lower()
    assert got == want


def _saved_full_sequence_inputs(rank, world_size, out_file):
    """tp=2 + SP, one tiny-glm2 block: which saved activations are full-sequence [b, s, h] (all-gathered)."""
    import torch

    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    pc = ParallelContext.init(tp=2, sequence_parallel=True)
    cfg = ModelConfig.from_preset("tiny-glm2", num_layers=1, ffn_hidden_size=96)  # no width equal to hidden
    torch.manual_seed(0)
    model = build_model(cfg, pc)
    b, s, h = 2, cfg.seq_length, cfg.hidden_size
    params = {p.data_ptr() for p in model.parameters()}
    seen, inside = {}, [False]
    model.layers[0].register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    model.layers[0].register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def pack(t):
        if inside[0] and t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel()
        return t
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids).sum().backward()
    full = [n for n in seen.values() if n == b * s * h]  # [b, s, h] (or flattened); SP shards hold b*s*h/2
    if rank == 0:
        with open(out_file, "w") as f:
            f.write(str(len(full)))


def test_sequence_parallel_keeps_the_gathered_gemm_inputs(tmp_path):
    """What megaocto.model.memory counts at full size under SP: the QKV and fc1 inputs, all-gathered and saved by
    F.linear for the weight gradient (2 tensors of [b, s, h] per layer; Korthikanti's SP would keep s/tp)."""
    from dist_utils import run_distributed

    from megaocto.model.memory import activation_bytes_per_layer

    out = tmp_path / "n"
    run_distributed(_saved_full_sequence_inputs, 2, str(out))
    assert int(out.read_text()) == 2
    cfg = ModelConfig.from_preset("tiny-glm2")
    kw = dict(micro_batch=2, seq_len=64, elem=2, flash_attention=True, selective=False)
    sp = activation_bytes_per_layer(cfg, tp=2, sequence_parallel=True, **kw)
    no_sp = activation_bytes_per_layer(cfg, tp=2, sequence_parallel=False, **kw)
    h = cfg.hidden_size
    # SP halves only the two norms' inputs (bf16 [b, s, h] each) here; the 2 gathered GEMM inputs stay whole
    assert no_sp - sp == 2 * (2 * 2 * 64 * h) / 2


def test_cli_starcoder_published_cluster(capsys):
    rc = main(["plan", "--preset", "starcoder-15b", "--gpus", "512", "--gpu", "a100", "--gpu-memory", "80GB",
               "--seq-length", "8192", "--global-batch", "512", "--network-gbit", "400", "--no-overlap-grad-reduce",
               "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "network 400 Gbit/s per node" in out and "after the backward (not overlapped)" in out
    shape_table = out.split("best layout of each tp x pp shape")[1].splitlines()
    tp4pp4 = [ln for ln in shape_table if ln.split()[1:3] == ["4", "4"]]
    assert tp4pp4 and int(tp4pp4[0].split()[0]) <= 4
    assert "recommended for megaocto (rank 1)" in out


def test_no_layout_when_the_batch_does_not_split(capsys):
    # 6 GPUs: tiny-bigcode splits over tp 1 or 2 (4 heads) and pp 1 or 2 (2 layers), so dp is 6 or 3; 7 sequences
    p = _plan("tiny-bigcode", "a100", 6, 64, 7)
    assert p.estimates == [] and p.skipped["global batch not divisible by dp"] > 0
    assert "no layout can be formed" in format_plan(p)


def test_lora_plans_a_frozen_base():
    """LoRA (model.lora): less memory (weights only for the base), fewer FLOPs (no weight-gradient GEMMs) and DP
    traffic of the adapters only, against the same model fully finetuned."""
    from megaocto.config.model import LoraConfig

    full = ModelConfig.from_preset("starcoder-15b", seq_length=2048)
    lora = ModelConfig.from_preset("starcoder-15b", seq_length=2048,
                                   lora=LoraConfig(rank=16, alpha=32, target_modules=["c_proj", "c_attn"]))
    hw = Hardware(GPUS["a100"], 8)
    lay = Layout(tp=2, pp=1, dp=4, micro_batch=4, num_microbatches=2, zero1=False, recompute="none",
                 sequence_parallel=True)
    f, lo = (estimate(c, hw, lay, seq_len=2048, global_batch=32) for c in (full, lora))
    assert lo.memory.total < 0.5 * f.memory.total
    assert lo.compute_s < 0.7 * f.compute_s
    assert lo.dp_s == 0.0 or lo.dp_s < 0.05 * f.dp_s
    p = plan(lora, hw, seq_len=2048, global_batch=32, model="lora")
    assert "LoRA: frozen base" in format_plan(p)
