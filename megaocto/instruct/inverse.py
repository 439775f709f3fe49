"""Inverse-Instruct (InverseCoder): the instruction-tuned model writes instructions for the code of its own
training data, scores them itself, and the best one per code is kept.

Stages (each reads and writes jsonl; the generating ones are resumable and shardable, see resumable.py):

1. :func:`extract_code` — the first fenced block of a response (from the first fence to the next one, a closing
   fence appended; with a single fence everything after it but the last character, as upstream's slice does),
   else the whole response wrapped in a ``python`` fence when it parses with ``ast.parse``, else dropped.
2. summarize — K instructions per code: the Magicoder template with the instruction *"This is a response code
   snippet to a programming problem, please give the problem description:"* + the code, the response pre-filled
   with a random prefix (``Write a``, ``Create a``, ...; + ``" " + fence language`` when the code has one);
   temperature 0.8, repetition penalty 1.1, stop at a fence; the stored instruction is prefix + generated text.
3. score — LM-score = p(Yes) / (p(Yes) + p(No)) of the next token after the self-evaluation prompt. ``native``: from
   megaocto's own full-vocabulary logits, summing the probability of every vocabulary token whose text is a
   Yes (resp. No) surface variant (``yes``/``Yes``/``YES``, with or without a leading space). ``compat``:
   InverseCoder's rule through an endpoint — the top-5 logprobs of the first generated token, "Yes" for yes,
   "No" else "As" for no, a token missing from the top 5 counting as logprob -100.
4. select — per code the instruction with the highest score; output sorted by ascending score as upstream, with
   ``instruction``/``response`` keys (``megaocto preprocess --format instruction-response``).
"""
from __future__ import annotations

import ast
import dataclasses
import math
import random

from megaocto.data.formats import MAGICODER_OSS_PREFIX, magicoder_prompt

SUMMARIZE_INSTRUCTION = "This is a response code snippet to a programming problem, please give the problem description:"
PREFIXES = ("Write a", "Create a", "Implement a", "Develop a", "Design a", "Build a", "I want a")


def extract_code(response: str) -> tuple[str | None, str]:
    """``(code block or None, reason)``; reason is ``fenced``, ``python`` (whole response parsed) or
    ``no_code`` (dropped)."""
    if "```" not in response:
        try:
            ast.parse(response)
        except (SyntaxError, ValueError):
            return None, "no_code"
        return "```python\n" + response + "```", "python"
    start = response.find("```")
    end = response.find("```", start + 1)
    block = response[start:end]  # end == -1: up to the last character, as upstream's slice
    if not block:
        block = response[start:]
    return block + "```", "fenced"


def _redecode(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def fence_language(code: str) -> str:
    """The tag of the first fence line (``"```python"`` → ``"python"``), "" when none."""
    for line in code.splitlines():
        if "```" in line:
            return line.split("```")[1]
    return ""


def summarize_prompt(code: str) -> str:
    """The summarization prompt before the prefix: Magicoder's template, empty response."""
    return magicoder_prompt(f"{SUMMARIZE_INSTRUCTION}\n{code}")


def choose_prefix(seed: int, row: int, code: str) -> str:
    """The response prefix of summary ``row``: a seeded choice from :data:`PREFIXES` (+ the fence language)."""
    prefix = random.Random(seed * 1_000_003 + row).choice(PREFIXES)
    lang = fence_language(code)
    return f"{prefix} {lang}" if lang else prefix


def score_prompt(instruction: str, code: str) -> str:
    """InverseCoder's self-evaluation prompt (Magicoder template, empty response)."""
    return magicoder_prompt(f"Here is a programming problem:\n{instruction}\n\nHere is the answer code to the "
                            f"problem:\n{code}\nIs the answer correct? Your reply should begin with Yes or No.")


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """Every vocabulary id whose decoded text, stripped and lower-cased, is ``word`` (``"yes"`` / ``"no"``)."""
    return [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).strip().lower() == word]


def lm_scores(logits, yes_ids: list[int], no_ids: list[int]):
    """LM-score per row of full-vocabulary logits ``[n, V]``: p(yes set) / (p(yes set) + p(no set)), computed as
    ``sigmoid(logsumexp(yes) - logsumexp(no))`` in fp32 (the softmax normaliser cancels)."""
    import torch

    if not yes_ids or not no_ids:
        raise ValueError("the tokenizer has no token for Yes or for No; LM-scores need both")
    logits = logits.float()
    lse_yes = torch.logsumexp(logits[:, yes_ids], dim=-1)
    lse_no = torch.logsumexp(logits[:, no_ids], dim=-1)
    return torch.sigmoid(lse_yes - lse_no)


def compat_score(top_logprobs: dict[str, float], yes: str = "Yes", no: tuple[str, ...] = ("No", "As")) -> float:
    """InverseCoder's yes_prob from the first token's top logprobs (token text → logprob)."""
    def first(tokens):
        for t in tokens:
            if t in top_logprobs:
                return top_logprobs[t]
        return -100.0
    y, n = first((yes,)), first(no)
    return math.exp(y) / (math.exp(y) + math.exp(n))


@dataclasses.dataclass
class InverseConfig:
    """Settings of the Inverse-Instruct stages (all enter the fingerprints of the stages they affect).

    Attributes:
        num_instructions: K instructions generated per code (InverseCoder: 10).
        temperature: summarization temperature (0.8).
        top_p: summarization nucleus mass (1.0).
        repetition_penalty: summarization repetition penalty (1.1).
        max_new_tokens: most tokens per instruction (2048).
        seed: base seed (prefix choice and sampling; row r uses seed + r).
        score_mode: native (full-vocabulary logits, in-process) or compat (top-5 logprobs via an endpoint).
        oss_prefix: prepend "Write a solution to the following coding problem:\\n" to selected instructions
            (InverseCoder's OSS variant).
    """
    num_instructions: int = 10
    temperature: float = 0.8
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    max_new_tokens: int = 2048
    seed: int = 42
    score_mode: str = "native"
    oss_prefix: bool = False


def select_best(rows: list[dict], *, oss_prefix: bool = False) -> list[dict]:
    """Top-1 per ``code_index`` by ``score`` (ties: the earliest row), sorted by ascending score."""
    best: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: r["index"]):
        cur = best.get(r["code_index"])
        if cur is None or r["score"] > cur["score"]:
            best[r["code_index"]] = r
    out = []
    for code_index, r in best.items():
        instruction = (MAGICODER_OSS_PREFIX if oss_prefix else "") + r["instruction"]
        out.append({"index": code_index, "instruction": instruction, "response": r["response"],
                    "score": r["score"]})
    out.sort(key=lambda r: (r["score"], r["index"]))
    return out
