"""LoRA parity with HF PEFT on the transformers twin of tiny models of every family: identical adapters give the
same logits, loss and adapter gradients (fp32, <= 1e-4); the PEFT export loads with PeftModel.from_pretrained and
reads back into megaocto unchanged."""
import pytest
import torch
import torch.nn.functional as F

from megaocto.config.model import LoraConfig, ModelConfig
from megaocto.convert.hf import FAMILIES
from megaocto.convert.peft import from_peft, read_peft_adapter, to_peft, write_peft_adapter
from megaocto.model import build_model
from megaocto.model.lora import base_state_dict, lora_state_dict
from megaocto.parallel.context import ParallelContext
from test_lora import randomize_adapters

peft = pytest.importorskip("peft")

CASES = {"bigcode-mqa": ("tiny-bigcode", {}, ["c_attn", "c_proj", "c_fc"]),
         "bigcode-mha": ("tiny-bigcode", {"num_query_groups": 4}, ["c_attn", "attn.c_proj", "fc2"]),
         "glm2": ("tiny-glm2", {}, ["q_proj", "k_proj", "v_proj", "dense", "up", "down"]),
         "llama": ("tiny-llama", {}, ["q", "k", "v", "o", "gate", "up", "down"])}
TOL = dict(atol=1e-4, rtol=1e-4)


def _hf_twin(model, cfg):
    from transformers import AutoModelForCausalLM

    family = FAMILIES[cfg.family]
    hf = AutoModelForCausalLM.from_config(family.hf_config(cfg, dtype=torch.float32))
    state = dict(family.iter_to_hf(cfg, iter(base_state_dict(model).items())))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.eval()


def _loss(logits, ids, vocab):
    return F.cross_entropy(logits[:, :-1, :vocab].reshape(-1, vocab), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("case", list(CASES))
def test_peft_parity_logits_loss_grads(case, tmp_path):
    preset, overrides, targets = CASES[case]
    cfg = ModelConfig.from_preset(preset, **overrides, attention_dropout=0.0, hidden_dropout=0.0,
                                  lora=LoraConfig(rank=4, alpha=8.0, target_modules=targets))
    pc = ParallelContext.single()
    torch.manual_seed(0)
    model = build_model(cfg, pc).eval()
    randomize_adapters(model, pc)
    hf = _hf_twin(model, cfg)
    write_peft_adapter(str(tmp_path), cfg, lora_state_dict(model), base="twin")
    ref = peft.PeftModel.from_pretrained(hf, str(tmp_path), is_trainable=True).eval()

    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    ours = model(ids)[..., :cfg.vocab_size]
    theirs = ref(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, **TOL)
    loss_ours, loss_theirs = _loss(ours, ids, cfg.vocab_size), _loss(theirs, ids, cfg.vocab_size)
    torch.testing.assert_close(loss_ours, loss_theirs, **TOL)
    loss_ours.backward()
    loss_theirs.backward()
    # PEFT's gradients, mapped to megaocto's adapters by the importer, equal ours
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    conf = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0}
    _, mapped = from_peft(cfg, conf, grads)
    ours_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(mapped) == set(lora_state_dict(model)), set(mapped) ^ set(lora_state_dict(model))
    for n, g in ours_grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(g, mapped[n], **TOL, msg=f"{case}: {n}")

    # the folder reads back into exactly the adapters we wrote
    lora, full = read_peft_adapter(str(tmp_path), ModelConfig(**{**cfg.to_dict(), "lora": {}}))
    assert (lora.rank, lora.alpha) == (4, 8.0)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(full[k], v), k


def test_glm2_query_key_value_exports_as_three_projections():
    """One A over the fused [q|k|v] (ChatGLM2's adapter) is written as q/k/v_proj adapters with the A repeated."""
    cfg = ModelConfig.from_preset("tiny-glm2", lora=LoraConfig(rank=4, alpha=8.0,
                                                              target_modules=["query_key_value"]))
    pc = ParallelContext.single()
    torch.manual_seed(0)
    model = build_model(cfg, pc).eval()
    randomize_adapters(model, pc)
    tensors, modules = to_peft(cfg, lora_state_dict(model))
    assert modules == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    hf = _hf_twin(model, cfg)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=modules)).eval()
    peft.set_peft_model_state_dict(ref, {k.replace("base_model.model.", "base_model.model."): v
                                         for k, v in tensors.items()})
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :cfg.vocab_size], ref(input_ids=ids).logits, **TOL)


def test_two_adapters_on_one_peft_module_refused():
    from megaocto.convert.core import ConversionError

    cfg = ModelConfig.from_preset("tiny-glm2", lora=LoraConfig(rank=4, target_modules=["query_key_value", "q"]))
    torch.manual_seed(0)
    model = build_model(cfg, ParallelContext.single())
    with pytest.raises(ConversionError, match="one PEFT module self_attn.q_proj"):
        to_peft(cfg, lora_state_dict(model))
