"""Llama-family tokenizers and the BOS protocol: a tiny CodeLlama-style sentencepiece ``tokenizer.model`` and a
tiny DeepSeek-Coder-style ``tokenizer.json`` (both built here, no network) give transformers' ids (BOS prepended),
their BOS/EOS ids; preprocess and generation prompts start with BOS exactly when the tokenizer says so; and an
exported HF folder (model + tokenizer) generates the same greedy tokens as ``megaocto generate``."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from llama_reference import CODE_TEXTS, write_codellama_tokenizer
from megaocto.data.tokenizer import encode_prompt, load_tokenizer, train_bpe_tokenizer

TEXTS = CODE_TEXTS
SAMPLES = ["def add(a, b):", "print('hi')\n", "x = 1  # é\n  y", ""]
# transformers 5's CodeLlamaTokenizer drops sentencepiece's dummy "▁" before a text that starts with spaces; megaocto
# (like Meta's reference tokenizer, which the models were trained with) keeps sentencepiece's ids there.
LEADING_SPACE = "  x = 1"
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


@pytest.fixture(scope="module")
def codellama_dir(tmp_path_factory):
    return write_codellama_tokenizer(str(tmp_path_factory.mktemp("codellama")))


def _deepseek_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(DS_BOS, special=True), AddedToken(DS_EOS, special=True)])
    bos = tok.token_to_id(DS_BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{DS_BOS} $A", pair=f"{DS_BOS} $A {DS_BOS} $B",
                                      special_tokens=[(DS_BOS, bos)])])
    return tok


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    """tokenizer.json (byte-level BPE, BOS/EOS added after the merges, a BOS-prepending post-processor) +
    DeepSeek-Coder's tokenizer_config.json (AddedToken dicts)."""
    path = tmp_path_factory.mktemp("deepseek")
    _deepseek_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": _added(DS_BOS), "eos_token": _added(DS_EOS),
         "pad_token": _added(DS_EOS), "tokenizer_class": "LlamaTokenizerFast", "legacy": True}))
    return str(path)


def _sp(directory):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))


def _pieces(directory):
    return _sp(directory).GetPieceSize()


def _hf_ids(directory, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)(text)["input_ids"]


def test_codellama_sentencepiece_matches_transformers(codellama_dir):
    for path in (codellama_dir, os.path.join(codellama_dir, "tokenizer.model")):
        tok = load_tokenizer(path)
        assert (tok.bos, tok.eod, tok.add_bos) == (1, 2, True)
        assert tok.vocab_size == _pieces(codellama_dir)  # the pieces only: no ChatGLM2 [gMASK] etc.
        for text in SAMPLES:
            ids = encode_prompt(tok, text)
            assert ids == _hf_ids(codellama_dir, text), text
            assert ids[0] == 1 and 1 not in tok.encode(text)  # encode itself never adds BOS
            assert tok.decode(ids[1:]) == text
        assert tok.encode(LEADING_SPACE) == _sp(codellama_dir).EncodeAsIds(LEADING_SPACE)


def test_sentencepiece_without_llama_config_keeps_chatglm2_behaviour(codellama_dir, tmp_path):
    shutil.copy(os.path.join(codellama_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == _pieces(codellama_dir) + 5 and tok.add_bos is False  # [MASK] [gMASK] [sMASK] sop eop appended
    assert encode_prompt(tok, "def") == tok.encode("def")
    tok = load_tokenizer(str(tmp_path), sp_special_tokens=(), add_bos=True)  # explicit
    assert tok.vocab_size == _pieces(codellama_dir) and encode_prompt(tok, "def") == [1] + tok.encode("def")


def test_deepseek_tokenizer_json_matches_transformers(deepseek_dir, tmp_path):
    ref = _deepseek_tokenizer()
    bos, eos = ref.token_to_id(DS_BOS), ref.token_to_id(DS_EOS)
    tok = load_tokenizer(deepseek_dir)
    assert (tok.bos, tok.eod, tok.pad, tok.add_bos) == (bos, eos, eos, True)
    for text in SAMPLES:
        ids = encode_prompt(tok, text)
        assert ids == _hf_ids(deepseek_dir, text), text
        assert ids[0] == bos and bos not in tok.encode(text)
    # without tokenizer_config.json: BOS from the post-processor, EOS from the known end-of-sentence names
    shutil.copy(os.path.join(deepseek_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    bare = load_tokenizer(str(tmp_path))
    assert (bare.bos, bare.eod, bare.add_bos) == (bos, eos, True)
    assert load_tokenizer(str(tmp_path), add_bos=False).add_bos is False


def test_starcoder_style_tokenizer_adds_no_bos(tmp_path):
    path = str(tmp_path / "tokenizer.json")
    train_bpe_tokenizer(TEXTS, 300, path, min_frequency=1)
    tok = load_tokenizer(path)
    assert tok.add_bos is False and tok.bos == tok.eod == 0
    assert encode_prompt(tok, "def add") == tok.encode("def add")
    assert encode_prompt(tok, "") == [tok.eod]


def test_encode_prompt_truncation_keeps_bos(codellama_dir):
    tok = load_tokenizer(codellama_dir)
    ids = tok.encode("for i in range(10):\n    x += i\n")
    assert encode_prompt(tok, "for i in range(10):\n    x += i\n", max_tokens=4) == [1] + ids[-3:]
    assert encode_prompt(tok, "for i", max_tokens=1) == [1]
    assert encode_prompt(tok, "", max_tokens=3) == [1]


@pytest.mark.parametrize("flag", [None, False])
def test_preprocess_prepends_bos_for_llama_tokenizers(codellama_dir, tmp_path, flag):
    from megaocto.data.indexed import MMapIndexedDataset
    from megaocto.data.preprocess import PreprocessConfig, preprocess

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))
    prefix = str(tmp_path / "out")
    preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=prefix, tokenizer=codellama_dir, prepend_bos=flag,
                                log_interval=0), log=lambda m: None)
    ds = MMapIndexedDataset(prefix + "_text_document")
    tok = load_tokenizer(codellama_dir)
    for i, text in enumerate(TEXTS[:3]):
        want = ([1] if flag is None else []) + tok.encode(text) + [2]
        assert np.asarray(ds[i]).tolist() == want


def test_generate_text_prompts_start_with_bos(codellama_dir, monkeypatch):
    import importlib

    gen_mod = importlib.import_module("megaocto.generation.generate")  # the module (the package exports a function)
    tok = load_tokenizer(codellama_dir)
    seen = []
    monkeypatch.setattr(gen_mod, "generate", lambda model, prompts, gen, pc, **kw: seen.extend(prompts) or
                        [[] for _ in prompts])
    gen_mod.generate_text(None, tok, ["def add(", ""], gen_mod.GenerationConfig(max_new_tokens=2))
    assert seen == [[1] + tok.encode("def add("), [1]]


def test_exported_folder_with_tokenizer_generates_like_megaocto_generate(codellama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaocto.cli import main as cli_main
    from megaocto.config.model import ModelConfig
    from megaocto.convert.core import write_megaocto_checkpoint
    from megaocto.convert.hf import to_hf
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    tok = load_tokenizer(codellama_dir)
    cfg = ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, ParallelContext.single())
    ck, exported = str(tmp_path / "ck"), str(tmp_path / "hf")
    write_megaocto_checkpoint(ck, cfg, model.state_dict(), 1, progress=False)
    to_hf(ck, exported, tokenizer=codellama_dir, progress=False)
    hf_tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    prompts = ["def add(a, b):", "class Foo"]
    assert cli_main(["generate", "--load", ck, "--tokenizer", codellama_dir, "--max-new-tokens", "8",
                     "--no-eos-stop", "--jsonl", *sum((["--prompt", p] for p in prompts), [])]) == 0
    ours = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(ours) == 2
    for prompt, text in zip(prompts, ours):
        ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == 1  # AutoTokenizer prepends BOS, as megaocto's encode_prompt does
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        new = out[0, ids.shape[1]:].tolist()
        assert text == tok.decode(ids[0, 1:].tolist() + new)[len(prompt):]


def test_export_takes_bos_eos_ids_from_the_tokenizer(deepseek_dir, tmp_path):
    """A llama checkpoint that was not converted from HF (e.g. trained from scratch) gets the tokenizer's BOS/EOS ids
    in config.json when exported with --tokenizer (DeepSeek-Coder's are not Llama's default 1/2)."""
    from megaocto.config.model import ModelConfig
    from megaocto.convert.core import write_megaocto_checkpoint
    from megaocto.convert.hf import to_hf
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    tok = load_tokenizer(deepseek_dir)
    cfg = ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size)
    ck = str(tmp_path / "ck")
    write_megaocto_checkpoint(ck, cfg, build_model(cfg, ParallelContext.single()).state_dict(), 1, progress=False)
    to_hf(ck, str(tmp_path / "hf"), tokenizer=deepseek_dir, progress=False)
    conf = json.load(open(tmp_path / "hf" / "config.json"))
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (tok.bos, tok.eod) != (1, 2)
    to_hf(ck, str(tmp_path / "hf2"), progress=False)  # no tokenizer: Llama's defaults
    conf = json.load(open(tmp_path / "hf2" / "config.json"))
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (1, 2)
