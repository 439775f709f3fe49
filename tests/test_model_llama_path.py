"""The tiny-llama path end to end: jsonl -> preprocess (CodeLlama-style tokenizer, BOS first) -> `megaocto train`
(launch/configs/tiny-llama.yaml, a few steps) -> `megaocto convert to-hf` with the tokenizer -> transformers
AutoModelForCausalLM + AutoTokenizer -> the same greedy tokens as `megaocto generate`."""
import json
import os

import numpy as np
import torch

from llama_reference import CODE_TEXTS, write_codellama_tokenizer
from megaocto.cli import main as cli_main
from megaocto.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_llama_data_train_convert_transformers_generate(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = write_codellama_tokenizer(str(tmp_path / "tok"))
    tok = load_tokenizer(tok_dir)
    src = tmp_path / "code.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE_TEXTS))
    prefix = str(tmp_path / "data" / "code")
    assert cli_main(["preprocess", "--input", str(src), "--output-prefix", prefix, "--tokenizer", tok_dir,
                     "--log-interval", "0"]) == 0
    from megaocto.data.indexed import MMapIndexedDataset
    assert np.asarray(MMapIndexedDataset(prefix + "_text_document")[0]).tolist()[:1] == [tok.bos]

    run = str(tmp_path / "run")
    assert cli_main(["train", "--config", os.path.join(REPO, "launch", "configs", "tiny-llama.yaml"),
                     "--model.vocab_size", str(tok.vocab_size), "--model.seq_length", "32",
                     "--data.kind", "gpt", "--data.paths", prefix + "_text_document", "--data.tokenizer", tok_dir,
                     "--data.split", "90,10,0", "--data.num_workers", "0", "--train.iters", "12",
                     "--train.micro_batch_size", "4", "--train.global_batch_size", "4",
                     "--schedule.warmup_iters", "2", "--optimizer.lr", "3e-3",
                     "--checkpoint.save", run, "--checkpoint.load", run, "--checkpoint.save_interval", "12",
                     "--logging.run_dir", run, "--logging.tensorboard", "false", "--eval.interval", "12"]) == 0
    log = capsys.readouterr()
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.5, (losses, log.err[-2000:])  # it learns

    exported = str(tmp_path / "hf")
    assert cli_main(["convert", "to-hf", "--load", run, "--output", exported, "--tokenizer", tok_dir, "--verify",
                     "--quiet"]) == 0
    assert "verify: ok" in capsys.readouterr().out
    hf_tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    assert hf.config.model_type == "llama" and hf.config.bos_token_id == 1 and hf.config.eos_token_id == 2

    prompts = ["def add(a, b):", "for i in range("]
    assert cli_main(["generate", "--load", run, "--max-new-tokens", "10", "--no-eos-stop", "--jsonl",
                     *sum((["--prompt", p] for p in prompts), [])]) == 0  # tokenizer: the run's data.tokenizer
    ours = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(ours) == len(prompts)
    for prompt, text in zip(prompts, ours):
        ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        new = out[0, ids.shape[1]:].tolist()
        assert text == tok.decode(ids[0, 1:].tolist() + new)[len(prompt):], (prompt, text, new)
