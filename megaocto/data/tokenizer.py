"""Tokenizers: HF ``tokenizer.json`` (StarCoder, DeepSeek-Coder, Llama fast) and sentencepiece ``.model``
(ChatGLM2/CodeGeeX2, CodeLlama).

``load_tokenizer(path)`` returns an object with ``encode(text) -> list[int]``, ``encode_batch(texts)``,
``decode(ids)``, ``vocab_size``, ``eod``, ``pad``, ``bos``, ``add_bos`` and ``token_to_id(token)``. ``encode``
never adds BOS/EOS. Special-token strings in the text (``<commit_before>``, ``[gMASK]``) become their ids.

BOS protocol: ``add_bos`` says whether the model expects ``bos`` in front of every document and prompt (Llama
family: CodeLlama ``<s>`` = 1, DeepSeek-Coder ``<｜begin▁of▁sentence｜>`` = 32013; StarCoder and ChatGLM2: no).
Whoever starts a sequence adds it: :func:`encode_prompt` (generation, evaluation) and the preprocess formats
(BOS before a document's first output, EOD after its last). ``add_bos`` comes from, in order: the caller
(``add_bos=``), ``add_bos_token`` in a ``tokenizer_config.json`` next to the tokenizer file, and for a
``tokenizer.json`` whether its post-processor prepends a special token; otherwise False. The same
``tokenizer_config.json`` supplies ``bos_token`` / ``eos_token`` (the EOD) when present, and a ``tokenizer_class``
naming a Llama tokenizer makes a sentencepiece ``.model`` load without ChatGLM2's extra special tokens.

``train_bpe_tokenizer`` trains a byte-level BPE whose ids 0..18 are StarCoder's 19 special tokens.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Iterator

# StarCoder's special tokens, ids 0..18 in this order (special_tokens_map.json of bigcode/starcoder).
STARCODER_SPECIAL_TOKENS = (
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
)
# ChatGLM2 / CodeGeeX2 add these after the sentencepiece vocabulary (ids n_pieces + i).
GLM2_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "<｜end▁of▁sentence｜>")
_PAD_CANDIDATES = ("<fim_pad>", "<pad>", "[PAD]", "<|pad|>")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or lacks a token the caller needs."""


def tokenizer_config(path: str) -> dict:
    """The ``tokenizer_config.json`` next to tokenizer file ``path`` (HF's special-token settings), or {}."""
    import json

    conf_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    if not os.path.isfile(conf_path):
        return {}
    try:
        with open(conf_path, encoding="utf-8") as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{conf_path}: cannot read tokenizer_config.json: {e}") from None
    if not isinstance(conf, dict):
        raise TokenizerError(f"{conf_path}: expected a JSON object")
    return conf


def _config_token(conf: dict, key: str) -> str | None:
    """``bos_token`` / ``eos_token`` of a tokenizer_config.json: a string or ``{"content": ...}``."""
    v = conf.get(key)
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def is_llama_tokenizer_config(conf: dict) -> bool:
    """A tokenizer_config.json of a Llama-family sentencepiece tokenizer (LlamaTokenizer, CodeLlamaTokenizer)."""
    return "llama" in str(conf.get("tokenizer_class", "")).lower()


def encode_prompt(tok, text: str, max_tokens: int | None = None) -> list[int]:
    """Ids of a prompt that starts a sequence: ``encode(text)`` with ``bos`` in front when ``tok.add_bos``; an
    empty text gives ``[bos]`` or ``[eod]``. ``max_tokens`` keeps the last tokens of a longer prompt (BOS kept)."""
    ids = tok.encode(text)
    bos = [tok.bos] if getattr(tok, "add_bos", False) else []
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
        keep = max_tokens - len(bos)
        ids = ids[len(ids) - keep:] if 0 < keep < len(ids) else ids if keep > 0 else []
    return bos + ids if (bos or ids) else [tok.eod]


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` (what Megatron's TokenizerFromFile wraps)."""

    def __init__(self, path: str, eod_token: str | None = None, pad_token: str | None = None,
                 add_bos: bool | None = None):
        from tokenizers import Tokenizer

        self.path = path
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{path}: cannot load tokenizer.json: {e}") from None
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        conf = tokenizer_config(path)
        self.eod = _pick(self, eod_token or _config_token(conf, "eos_token"), _EOD_CANDIDATES, path, "EOD")
        pad = _pick(self, pad_token, _PAD_CANDIDATES, path, "pad", required=False)
        self.pad = self.eod if pad is None else pad
        prepended = self._prepended_special()
        if _config_token(conf, "bos_token") is not None:
            self.bos = _pick(self, _config_token(conf, "bos_token"), (), path, "BOS")
        elif prepended is not None:
            self.bos = prepended
        else:
            self.bos = self.eod if self.token_to_id("<|endoftext|>") == self.eod else self.token_to_id("<s>")
        if add_bos is None:
            add_bos = bool(conf.get("add_bos_token", prepended is not None))
        self.add_bos = _check_add_bos(add_bos, self.bos, path)

    def _prepended_special(self) -> int | None:
        """The id the tokenizer.json's post-processor puts in front of a single sequence (Llama / DeepSeek
        ``TemplateProcessing``), or None."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        if len(full) > len(plain) and full[len(full) - len(plain):] == plain and full[:1] != plain[:1]:
            return full[0]
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class SentencePieceTokenizer:
    """A sentencepiece ``.model``; ``special_tokens`` not already pieces get ids after the piece vocabulary
    (ChatGLM2/CodeGeeX2: ``[MASK] [gMASK] [sMASK] sop eop`` → vocab 64794)."""

    def __init__(self, path: str, special_tokens: Iterable[str] = GLM2_SPECIAL_TOKENS,
                 eod_token: str | None = None, pad_token: str | None = None, add_bos: bool = False):
        import sentencepiece as spm

        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load sentencepiece model: {e}") from None
        n = self._sp.GetPieceSize()
        self._special: dict[str, int] = {}
        for tok in special_tokens:
            pid = self._sp.PieceToId(tok)
            if pid == self._sp.unk_id() and tok != self._sp.IdToPiece(self._sp.unk_id()):
                self._special[tok] = n + len([t for t in self._special.values() if t >= n])
            else:
                self._special[tok] = pid
        self._special_by_id = {i: t for t, i in self._special.items()}
        self.vocab_size = n + sum(1 for i in self._special.values() if i >= n)
        self._split = (re.compile("(" + "|".join(re.escape(t) for t in sorted(self._special, key=len, reverse=True))
                                  + ")") if self._special else None)
        if eod_token is not None:
            self.eod = self._require(eod_token, "EOD")
        elif self._sp.eos_id() >= 0:
            self.eod = self._sp.eos_id()
        else:
            self.eod = _pick(self, None, _EOD_CANDIDATES, path, "EOD")
        if pad_token is not None:
            self.pad = self._require(pad_token, "pad")
        else:  # ChatGLM2 pads with unk (id 0)
            self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else max(self._sp.unk_id(), 0)
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.add_bos = _check_add_bos(add_bos, self.bos, path)

    def _require(self, token, what):
        tid = self.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.path}: {what} token {token!r} is not in the vocabulary")
        return tid

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self._sp.EncodeAsIds(text)
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._special[part])
            elif part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        out, run = [], []
        for i in (int(x) for x in ids):
            if i in self._special_by_id and (i >= self._sp.GetPieceSize()):
                if run:
                    out.append(self._sp.DecodeIds(run))
                    run = []
                out.append(self._special_by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.DecodeIds(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        pid = self._sp.PieceToId(token)
        if pid == self._sp.unk_id() and token != self._sp.IdToPiece(pid):
            return None
        return pid


def _check_add_bos(add_bos: bool, bos: int | None, path: str) -> bool:
    if add_bos and bos is None:
        raise TokenizerError(f"{path}: add_bos is set but the tokenizer has no BOS token")
    return bool(add_bos)


def _pick(tok, explicit, candidates, path, what, required=True):
    if explicit is not None:
        tid = tok.token_to_id(explicit)
        if tid is None:
            raise TokenizerError(f"{path}: {what} token {explicit!r} is not in the vocabulary")
        return tid
    for c in candidates:
        tid = tok.token_to_id(c)
        if tid is not None:
            return tid
    if required:
        raise TokenizerError(f"{path}: no {what} token found (tried {', '.join(candidates)}); "
                             f"pass eod_token= / --eod-token to name it")
    return None


def load_tokenizer(path: str, *, eod_token: str | None = None, pad_token: str | None = None,
                   sp_special_tokens: Iterable[str] | None = None, add_bos: bool | None = None):
    """Load ``tokenizer.json`` / a ``.model`` file, or a directory holding one of them (``tokenizer.json`` first).

    ``sp_special_tokens`` (sentencepiece only): extra tokens added after the pieces; None = ChatGLM2's
    ``[MASK] [gMASK] [sMASK] sop eop`` unless the ``tokenizer_config.json`` next to the file names a Llama
    tokenizer (then none). ``add_bos``: None = from the tokenizer files (see the module docstring)."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
            if not models:
                raise TokenizerError(f"{path}: directory has no tokenizer.json or *.model")
            path = os.path.join(path, models[0])
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: tokenizer file not found")
    if path.endswith(".model"):
        conf = tokenizer_config(path)
        llama = is_llama_tokenizer_config(conf)
        if sp_special_tokens is None:
            sp_special_tokens = () if llama else GLM2_SPECIAL_TOKENS
        if add_bos is None:
            add_bos = bool(conf.get("add_bos_token", llama))
        return SentencePieceTokenizer(path, sp_special_tokens, eod_token or _config_token(conf, "eos_token"),
                                      pad_token, add_bos)
    return HFTokenizer(path, eod_token, pad_token, add_bos)


def iter_training_texts(paths: Iterable[str], json_keys: Iterable[str] = ("text",),
                        stats: dict | None = None, keys_seen: dict | None = None) -> Iterator[str]:
    """Texts for tokenizer training: the ``json_keys`` of each ``.jsonl`` row, or each other file whole.

    Bad jsonl rows and non-UTF-8 files are skipped and counted in ``stats``. ``keys_seen`` (if given) gets
    ``rows`` (jsonl rows read), ``found`` ({key: rows holding it as a string}) and ``first_row_keys``.
    """
    from megaocto.data.jsonl import JsonlReader

    stats = {} if stats is None else stats
    keys = tuple(json_keys)
    seen = keys_seen if keys_seen is not None else {}
    seen.setdefault("rows", 0)
    found = seen.setdefault("found", {k: 0 for k in keys})
    for p in paths:
        if p.endswith((".jsonl", ".json")):
            reader = JsonlReader([p], required_keys=(), on_error="skip")
            for row in reader:
                seen["rows"] += 1
                if "first_row_keys" not in seen:
                    seen["first_row_keys"] = list(row.data)
                for k in keys:
                    v = row.data.get(k)
                    if isinstance(v, str):
                        found[k] += 1
                        if v:
                            yield v
            for reason, n in reader.stats.skipped.items():
                stats[f"jsonl: {reason}"] = stats.get(f"jsonl: {reason}", 0) + n
        else:
            try:
                with open(p, encoding="utf-8") as f:
                    yield f.read()
            except UnicodeDecodeError:
                stats["non-UTF-8 file"] = stats.get("non-UTF-8 file", 0) + 1


def _check_keys_found(keys_seen: dict) -> None:
    """A requested --json-keys key that no jsonl row holds is an error (it would train on nothing)."""
    if not keys_seen.get("rows"):
        return
    missing = [k for k, n in keys_seen["found"].items() if n == 0]
    if missing:
        raise TokenizerError(f"json key(s) {', '.join(map(repr, missing))} not found in any of the "
                             f"{keys_seen['rows']} jsonl rows (the first row has keys "
                             f"{', '.join(map(repr, keys_seen.get('first_row_keys', [])))}); pass --json-keys "
                             f"with the keys that hold the training text")


def train_bpe_tokenizer(files_or_iterator, vocab_size: int, output: str, *, min_frequency: int = 2,
                        json_keys: Iterable[str] = ("text",), special_tokens=STARCODER_SPECIAL_TOKENS) -> dict:
    """Train a byte-level BPE (digits split individually, as StarCoder) and save ``output`` (tokenizer.json).

    ``files_or_iterator``: paths (``.jsonl`` read by ``json_keys``; other files whole) or an iterable of
    strings. Ids ``0..len(special_tokens)-1`` are the special tokens in order. Returns a summary dict
    (requested/actual vocab size, skipped inputs); a corpus too small for ``vocab_size`` gives fewer merges.
    A ``json_keys`` key that no jsonl row holds raises TokenizerError (nothing is written).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    items = list(files_or_iterator) if isinstance(files_or_iterator, (list, tuple)) else None
    stats: dict = {}
    is_file = [isinstance(x, (str, os.PathLike)) and os.path.isfile(x) for x in items or []]
    keys_seen: dict = {}
    if items and all(is_file):
        texts = iter_training_texts([os.fspath(x) for x in items], json_keys, stats, keys_seen)
    elif any(is_file):
        missing = [x for x, f in zip(items, is_file) if not f]
        raise TokenizerError(f"training input mixes files with non-files; not found: {missing[:5]}")
    else:
        texts = iter(items if items is not None else files_or_iterator)
    if vocab_size <= len(special_tokens) + 256:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: it must exceed the {len(special_tokens)} "
                             f"special tokens + 256 byte symbols")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens))
    tok.train_from_iterator(texts, trainer=trainer)
    _check_keys_found(keys_seen)
    for i, t in enumerate(special_tokens):
        if tok.token_to_id(t) != i:
            raise TokenizerError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tok.save(output)
    return {"output": output, "vocab_size_requested": vocab_size,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True), "skipped": stats}
