"""Megatron ``tools/preprocess_data.py`` command lines on top of megaocto's preprocess.

``megaocto preprocess-megatron`` (and ``preprocess/preprocess_data.py``) accept the flags of Megatron-LM's and
bigcode Megatron-LM's ``tools/preprocess_data.py``, so an existing script such as OctoPack's
``training/preprocess.sh``::

    python tools/preprocess_data.py --input data.jsonl --output-prefix out --dataset-impl mmap \\
        --json-key inputs --tokenizer-type TokenizerFromFile --tokenizer-file tokenizer.json \\
        --workers 30 --chunk-size 1000

runs unchanged and writes what Megatron writes: ``{output_prefix}_{key}_document.bin/.idx`` per ``--json-keys``
key (MMIDIDX v1, uint16 below a 65500-token vocabulary), EOD appended only with ``--append-eod``. The files are
byte-identical to ``megaocto preprocess --format text --json-keys ... [--no-append-eod]`` on the same data.

What is translated, what is accepted because it changes nothing, and what is refused (an error naming the flag,
never silently ignored) is listed in :data:`FLAGS`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile

from megaocto.config.base import ConfigError

# Tokenizer types megaocto reproduces token for token, and the flag that names the tokenizer file.
SUPPORTED_TOKENIZERS = {
    "TokenizerFromFile": "--tokenizer-file",     # bigcode: PreTrainedTokenizerFast(tokenizer_file=...)
    "HuggingFaceTokenizer": "--tokenizer-model",  # NVIDIA: a local HF tokenizer directory or tokenizer.json
    "GPT2BPETokenizer": "--vocab-file",           # OpenAI GPT-2 byte-level BPE: --vocab-file + --merge-file
}
REFUSED_TOKENIZERS = {
    "SentencePieceTokenizer": "Megatron's SentencePieceTokenizer appends its own special tokens (<CLS>, <SEP>, "
                              "<EOD>, ...) to the vocabulary, which megaocto does not reproduce",
    "GPTSentencePieceTokenizer": "megaocto's sentencepiece loader is ChatGLM2-style (extra special tokens); use "
                                 "`megaocto preprocess --tokenizer MODEL` and check the ids",
    "Llama2Tokenizer": "Megatron's Llama2Tokenizer prepends BOS to every document, which megaocto does not",
    "BertWordPieceLowerCase": "BERT tokenizers are not supported (megaocto trains decoder code models)",
    "BertWordPieceCase": "BERT tokenizers are not supported (megaocto trains decoder code models)",
    "NullTokenizer": "the NullTokenizer is not supported",
}

# flag -> how megaocto handles it (documentation and --help; the parser below follows it)
FLAGS = {
    "--input": "the jsonl file (a local file; Hugging Face dataset names are refused)",
    "--json-keys": "one output per key: {prefix}_{key}_document (argparse also takes Megatron's --json-key)",
    "--tokenizer-type": f"{' or '.join(SUPPORTED_TOKENIZERS)}; others are refused with the reason",
    "--tokenizer-file": "the tokenizer.json of TokenizerFromFile",
    "--tokenizer-model": "the local tokenizer directory / tokenizer.json of HuggingFaceTokenizer",
    "--vocab-file, --merge-file": "GPT2BPETokenizer's vocab.json and merges.txt; accepted and unused with "
                                  "TokenizerFromFile / HuggingFaceTokenizer (as in Megatron)",
    "--append-eod": "append the tokenizer's EOD to every document (off by default, as in Megatron)",
    "--output-prefix": "writes {prefix}_{key}_document.bin/.idx",
    "--dataset-impl": "mmap (the default) only; lazy / cached are refused",
    "--workers": "worker processes; the output does not depend on it",
    "--chunk-size": "accepted: Megatron's Pool.imap chunk size, a speed knob that does not change the output",
    "--log-interval": "accepted: megaocto prints a progress line every 5 s instead of every N documents",
    "--lang, --keep-newlines": "accepted without --split-sentences (they do nothing then, as in Megatron)",
    "--keep-sequential-samples": "accepted: megaocto always keeps the input order",
    "--split-sentences": "refused: sentence splitting (NLTK) is not supported",
    "--partitions": "1 only; megaocto's workers already split the input (more partitions are refused)",
    "--subset": "refused: Hugging Face datasets are not loaded by name",
    "--vocab-size, --vocab-extra-ids": "refused when set (NullTokenizer / extra ids are not supported)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Megatron's flags (both trees), plus megaocto's ``--on-error``."""
    g = parser.add_argument_group("input data")
    g.add_argument("--input", required=True, help=FLAGS["--input"])
    g.add_argument("--subset", default=None, help=FLAGS["--subset"])
    g.add_argument("--json-keys", nargs="+", default=["text"], help=FLAGS["--json-keys"] + " (default: text)")
    g.add_argument("--split-sentences", action="store_true", help=FLAGS["--split-sentences"])
    g.add_argument("--keep-newlines", action="store_true", help=FLAGS["--lang, --keep-newlines"])
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, help=FLAGS["--tokenizer-type"])
    g.add_argument("--tokenizer-file", default=None, help=FLAGS["--tokenizer-file"])
    g.add_argument("--tokenizer-model", default=None, help=FLAGS["--tokenizer-model"])
    g.add_argument("--vocab-file", default=None, help=FLAGS["--vocab-file, --merge-file"])
    g.add_argument("--merge-file", default=None, help=FLAGS["--vocab-file, --merge-file"])
    g.add_argument("--vocab-size", type=int, default=None, help=FLAGS["--vocab-size, --vocab-extra-ids"])
    g.add_argument("--vocab-extra-ids", type=int, default=0,
                   help=FLAGS["--vocab-size, --vocab-extra-ids"] + " (default: %(default)s)")
    g.add_argument("--append-eod", action="store_true", help=FLAGS["--append-eod"])
    g.add_argument("--lang", default="english", help=FLAGS["--lang, --keep-newlines"])
    g = parser.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help=FLAGS["--output-prefix"])
    g.add_argument("--dataset-impl", default="mmap", help=FLAGS["--dataset-impl"] + " (default: %(default)s)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--workers", type=int, required=True, help=FLAGS["--workers"])
    g.add_argument("--chunk-size", type=int, default=None, help=FLAGS["--chunk-size"])
    g.add_argument("--log-interval", type=int, default=None, help=FLAGS["--log-interval"])
    g.add_argument("--partitions", type=int, default=1, help=FLAGS["--partitions"] + " (default: %(default)s)")
    g.add_argument("--keep-sequential-samples", action="store_true", help=FLAGS["--keep-sequential-samples"])
    g = parser.add_argument_group("megaocto")
    g.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="bad rows (invalid JSON, a key missing or not a string, a key empty after tokenization — "
                        "Megatron drops such a key's document from that key's file only, misaligning the keys): "
                        "fail at the first with file:line, or skip the row in every key and count it "
                        "(default: %(default)s)")


@contextlib.contextmanager
def megatron_config(args):
    """``(PreprocessConfig, notes)`` for a parsed Megatron command line; raises ConfigError (naming the flag)
    for what megaocto does not do. For GPT2BPETokenizer the vocab/merges become a temporary tokenizer.json
    (removed on exit)."""
    from megaocto.data.preprocess import PreprocessConfig

    _refuse_unsupported(args)
    kind = args.tokenizer_type
    flag = SUPPORTED_TOKENIZERS[kind]
    path = {"--tokenizer-file": args.tokenizer_file, "--tokenizer-model": args.tokenizer_model,
            "--vocab-file": args.vocab_file}[flag]
    if not path:
        raise ConfigError(f"--tokenizer-type {kind} needs {flag}")
    if kind == "GPT2BPETokenizer" and not args.merge_file:
        raise ConfigError("--tokenizer-type GPT2BPETokenizer needs --merge-file")
    for name, value in ((flag, path), ("--merge-file", args.merge_file if kind == "GPT2BPETokenizer" else None)):
        if value is not None and not os.path.exists(value):
            raise ConfigError(f"{name} {value}: not found (megaocto needs a local tokenizer file or directory)")
    if not os.path.isfile(args.input):
        raise ConfigError(f"--input {args.input}: not a local file (Hugging Face dataset names are not loaded; "
                          f"dump the dataset to jsonl first)")
    notes = []
    if kind != "GPT2BPETokenizer":
        for name, value in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
            if value is not None:
                notes.append(f"{name} is not used by {kind} (as in Megatron)")
    if kind == "HuggingFaceTokenizer":
        _check_hf_tokenizer(path, args.append_eod)
    tmp = tempfile.mkdtemp(prefix="megaocto-gpt2-") if kind == "GPT2BPETokenizer" else None
    try:
        if tmp is not None:
            path = gpt2_bpe_tokenizer_json(args.vocab_file, args.merge_file, os.path.join(tmp, "tokenizer.json"))
        yield PreprocessConfig(inputs=[args.input], output_prefix=args.output_prefix, tokenizer=path, format="text",
                               json_key=list(args.json_keys), workers=args.workers, on_error=args.on_error,
                               append_eod=args.append_eod, dtype="auto"), notes
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _refuse_unsupported(args) -> None:
    refused = [(args.split_sentences, "--split-sentences: sentence splitting (NLTK) is not supported; megaocto "
                                      "writes {prefix}_{key}_document datasets"),
               (args.subset is not None, "--subset: Hugging Face datasets are not loaded by name; dump the dataset "
                                         "to jsonl (ds.to_json(...)) and pass the file as --input"),
               (args.dataset_impl != "mmap", f"--dataset-impl {args.dataset_impl}: only mmap (MMIDIDX) is written"),
               (args.partitions != 1, f"--partitions {args.partitions}: not supported; megaocto's --workers already "
                                      f"split the input into byte ranges (drop --partitions)"),
               (args.vocab_size is not None, "--vocab-size: only used by the NullTokenizer, which is not supported"),
               (args.vocab_extra_ids != 0, "--vocab-extra-ids: extra ids (T5 sentinels) are not supported")]
    for bad, msg in refused:
        if bad:
            raise ConfigError(msg)
    kind = args.tokenizer_type
    if kind not in SUPPORTED_TOKENIZERS:
        reason = REFUSED_TOKENIZERS.get(kind, "unknown tokenizer type")
        raise ConfigError(f"--tokenizer-type {kind}: {reason}; supported: {', '.join(SUPPORTED_TOKENIZERS)}")


def gpt2_bpe_tokenizer_json(vocab_file: str, merge_file: str, output: str) -> str:
    """Megatron's GPT2BPETokenizer (OpenAI's GPT-2 byte-level BPE: its pre-tokenization regex, the merges, no
    special-token handling — ``<|endoftext|>`` in the text is plain text, EOD is its vocab id) as a
    ``tokenizer.json`` megaocto's loader reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        bpe = models.BPE.from_file(vocab_file, merge_file)
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise ConfigError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: cannot load the GPT-2 BPE: "
                          f"{e}") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id("<|endoftext|>") is None:
        raise ConfigError(f"--vocab-file {vocab_file}: has no <|endoftext|> (the EOD of GPT2BPETokenizer)")
    tok.save(output)
    return output


def _check_hf_tokenizer(path: str, append_eod: bool) -> None:
    """Megatron's HuggingFaceTokenizer (transformers AutoTokenizer) encodes with the tokenizer's post-processor
    (BOS/EOS for Llama-style tokenizers) and uses ``eos_token`` as EOD; megaocto never adds special tokens and
    picks EOD by name. Refuse a tokenizer where that would give other ids."""
    import json

    from megaocto.data.tokenizer import HFTokenizer, load_tokenizer

    tok = load_tokenizer(path)
    if not isinstance(tok, HFTokenizer):
        raise ConfigError(f"--tokenizer-model {path}: no tokenizer.json there (megaocto reads HF fast tokenizers)")
    probe = "def f(x):\n    return x\n"
    if tok._tok.encode(probe, add_special_tokens=True).ids != tok.encode(probe):
        raise ConfigError(f"--tokenizer-model {path}: this tokenizer adds special tokens (BOS/EOS) when encoding, "
                          f"as Megatron's HuggingFaceTokenizer does; megaocto's preprocess never adds them, so the "
                          f"ids would differ (use `megaocto preprocess` and put the tokens in the data instead)")
    config = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "tokenizer_config.json")
    if append_eod and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and tok.token_to_id(eos) not in (None, tok.eod):
            raise ConfigError(f"--tokenizer-model {path}: its eos_token {eos!r} (Megatron's EOD) is not the token "
                              f"megaocto appends ({tok.decode([tok.eod])!r}); use `megaocto preprocess` instead")
