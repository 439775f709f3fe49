"""OSS-Instruct (Magicoder): seed snippets from open-source code → a teacher writes a problem and a solution.

Behaviour of the original (ise-uiuc/magicoder ``generate_data.py``, ``data/prompt.txt``, ``clean_data.py``;
docs/instruct.md has the details and the reference):

* Documents of each language are considered in order (the first ``max_considered`` of them). Per chunk of
  ``chunk_size`` documents the RNG is seeded with ``seed + first index of the chunk``; per document a start line is
  drawn uniformly (``choice(range(len(lines)))``) and a length uniformly in [min_lines, max_lines]
  (``randint``); the snippet is ``lines[start:start + n]`` (line ends kept). The documents are then shuffled with
  ``numpy.random.default_rng(seed).permutation`` (what HF ``Dataset.shuffle(seed=...)`` does) and a document's
  ``lang_index`` is its position after the shuffle; the per-language quota takes the first ones.
* The teacher gets Magicoder's system message and ``prompt.txt`` with the snippet, byte for byte, with
  ``temperature``, ``n=1``, ``seed = seed + lang_index`` and
  ``max_tokens = min(max_new_tokens, teacher_context - len(tokens(prompt)) - 10)`` (skipped when <= 0).
* A response is kept when ``finish_reason == "stop"`` and :func:`parse_problem_solution` finds a non-empty problem
  and solution.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
from typing import Iterator

import numpy as np

# Magicoder's constants (data/prompt.txt and SYSTEM in generate_data.py, "DO NOT CHANGE"): byte-identical prompts.
SYSTEM = "You are exceptionally skilled at crafting high-quality programming problems and offering precise solutions."
PROMPT_TEMPLATE = (
    "Please gain inspiration from the following random code snippet to create a high-quality programming problem. "
    "Present your output in two distinct sections: [Problem Description] and [Solution].\n\n"
    "Code snippet for inspiration:\n```\n{code}\n```\n\n"
    "Guidelines for each section:\n\n"
    "1. [Problem Description]: This should be **completely self-contained**, providing all the contextual "
    "information one needs to understand and solve the problem. Assume common programming knowledge, but ensure "
    "that any specific context, variables, or code snippets pertinent to this problem are explicitly included.\n\n"
    "2. [Solution]: Offer a comprehensive, **correct** solution that accurately addresses the [Problem Description] "
    "you provided.")
ERROR_MARGIN = 10

# file extension -> language (Magicoder's 9 languages use these names)
EXTENSIONS = {".py": "python", ".ts": "typescript", ".tsx": "typescript", ".cs": "csharp", ".rs": "rust",
              ".swift": "swift", ".php": "php", ".java": "java", ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp",
              ".hpp": "cpp", ".hh": "cpp", ".h": "cpp", ".sh": "shell", ".bash": "shell", ".js": "javascript",
              ".go": "go", ".c": "c", ".rb": "ruby", ".kt": "kotlin", ".scala": "scala"}


def build_prompt(code: str) -> str:
    """Magicoder's user message for a seed snippet (``prompt.txt`` with ``{code}`` filled)."""
    return PROMPT_TEMPLATE.format(code=code)


def extract_seed_code(rng: random.Random, document: str, min_lines: int = 1, max_lines: int = 15) -> str:
    """A snippet of ``document`` as Magicoder draws it (an empty document gives "" and draws nothing)."""
    lines = document.splitlines(keepends=True)
    if not lines:
        return ""
    start = rng.choice(range(len(lines)))
    n = rng.randint(min_lines, max_lines)
    return "".join(lines[start:start + n])


def parse_problem_solution(text: str) -> tuple[str, str] | None:
    """Magicoder's parser: the first line containing ``[problem description]`` (lower-cased) and the first line
    containing ``[solution]``; the problem is the lines strictly between, the solution the lines after the
    solution header, both stripped. None when a header is missing or the problem header is not first."""
    lines = text.splitlines(keepends=True)
    p = s = None
    for i, line in enumerate(lines):
        low = line.lower()
        if p is None and "[problem description]" in low:
            p = i
        if s is None and "[solution]" in low:
            s = i
    if p is None or s is None or p >= s:
        return None
    return "".join(lines[p + 1:s]).strip(), "".join(lines[s + 1:]).strip()


# ---------------------------------------------------------------------------------------------- seed corpus
@dataclasses.dataclass
class Document:
    lang: str
    raw_index: int  # position among the considered documents of its language
    content: str


def _lang_of(path: str) -> str | None:
    return EXTENSIONS.get(os.path.splitext(path)[1].lower())


def read_documents(source: str, *, content_key: str = "content", lang_key: str = "lang", lang: str | None = None
                   ) -> Iterator[tuple[str, str]]:
    """``(lang, content)`` of every document of ``source``: a ``.jsonl`` file (``content_key``; language from
    ``lang_key`` or ``lang``), a local git repository (the files of HEAD), or a directory of source files (sorted
    walk). Files of unknown extension are skipped (directories and repos); ``lang`` forces one language."""
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source}:{n}: invalid JSON: {e.msg}") from None
                if not isinstance(row, dict) or not isinstance(row.get(content_key), str):
                    raise ValueError(f"{source}:{n}: expected an object with a string {content_key!r}")
                language = lang or row.get(lang_key)
                if not isinstance(language, str) or not language:
                    raise ValueError(f"{source}:{n}: no language: the row has no string {lang_key!r}; pass --lang")
                yield language, row[content_key]
        return
    if not os.path.isdir(source):
        raise ValueError(f"{source}: not a file or directory")
    if os.path.exists(os.path.join(source, ".git")):
        yield from _git_documents(source, lang)
        return
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            language = lang or _lang_of(name)
            if language is None:
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                yield language, f.read()


def _git_documents(repo: str, lang: str | None) -> Iterator[tuple[str, str]]:
    names = subprocess.run(["git", "-C", repo, "ls-tree", "-r", "-z", "--name-only", "HEAD"], check=True,
                           capture_output=True).stdout.decode("utf-8", "replace").split("\0")
    for name in sorted(n for n in names if n):
        language = lang or _lang_of(name)
        if language is None:
            continue
        blob = subprocess.run(["git", "-C", repo, "show", f"HEAD:{name}"], capture_output=True)
        if blob.returncode == 0:
            yield language, blob.stdout.decode("utf-8", "replace")


@dataclasses.dataclass
class Seed:
    """One seed snippet to send: ``index`` is global (unique over languages), ``lang_index`` Magicoder's index."""
    index: int
    lang: str
    lang_index: int
    raw_index: int
    seed: str


def build_seeds(documents: Iterator[tuple[str, str]], *, seed: int = 976, min_lines: int = 1, max_lines: int = 15,
                chunk_size: int = 1000, max_considered: int | None = 150000,
                quotas: dict[str, int] | None = None, default_quota: int | None = None) -> list[Seed]:
    """Seeds of every language, languages in sorted order, each shuffled as Magicoder and cut to its quota
    (``quotas[lang]``, else ``default_quota``; None = all). ``index`` numbers them globally in that order."""
    per_lang: dict[str, list[str]] = {}
    for language, content in documents:
        docs = per_lang.setdefault(language, [])
        if max_considered is None or len(docs) < max_considered:
            docs.append(content)
    seeds: list[Seed] = []
    for language in sorted(per_lang):
        docs = per_lang[language]
        snippets = []
        rng = random.Random()
        for i, doc in enumerate(docs):
            if i % chunk_size == 0:
                rng.seed(seed + i)
            snippets.append(extract_seed_code(rng, doc, min_lines, max_lines))
        order = np.random.default_rng(seed).permutation(len(docs))
        quota = (quotas or {}).get(language, default_quota)
        take = len(docs) if quota is None else min(quota, len(docs))
        for lang_index in range(take):
            raw = int(order[lang_index])
            seeds.append(Seed(len(seeds), language, lang_index, raw, snippets[raw]))
    return seeds


# ---------------------------------------------------------------------------------------------- token counting
def token_counter(tokenizer: str | None, teacher_model: str):
    """``count(text) -> int`` for the teacher's max_tokens: a megaocto/HF tokenizer file when given, else tiktoken
    for ``teacher_model`` when installed, else the UTF-8 byte count (an upper bound for byte-level BPEs)."""
    if tokenizer:
        from megaocto.data.tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer)
        return lambda text: len(tok.encode(text)), f"tokenizer {tokenizer}"
    try:
        import tiktoken
        try:
            enc = tiktoken.encoding_for_model(teacher_model)
        except KeyError:
            enc = tiktoken.get_encoding("cl100k_base")
        return lambda text: len(enc.encode(text)), f"tiktoken {enc.name}"
    except ImportError:
        return lambda text: len(text.encode("utf-8")), ("utf-8 bytes (upper bound; pip install tiktoken for the "
                                                        "teacher's count, or pass --count-tokenizer)")


@dataclasses.dataclass
class OSSConfig:
    """Settings of ``megaocto instruct oss-instruct`` (all but the I/O ones enter the run fingerprint).

    Attributes:
        seed: Magicoder's seed (976): chunk RNG seeds, the shuffle, the teacher's per-request seed offset.
        temperature: teacher temperature (Magicoder: 0).
        max_new_tokens: cap of max_tokens per request (Magicoder: 2500).
        teacher_context: the teacher's context length (Magicoder: 8192).
        min_lines: shortest snippet.
        max_lines: longest snippet.
        chunk_size: documents per RNG reseed (Magicoder: 1000).
        max_considered: documents considered per language (Magicoder: 150000; None = all).
    """
    seed: int = 976
    temperature: float = 0.0
    max_new_tokens: int = 2500
    teacher_context: int = 8192
    min_lines: int = 1
    max_lines: int = 15
    chunk_size: int = 1000
    max_considered: int | None = 150000


def make_work(teacher, cfg: OSSConfig, count_tokens):
    """The per-seed function for :func:`megaocto.instruct.runner.run_items`."""
    from megaocto.instruct.teacher import TeacherError

    def work(s: Seed):
        prompt = build_prompt(s.seed)
        base = {"index": s.index, "lang": s.lang, "lang_index": s.lang_index, "raw_index": s.raw_index,
                "seed": s.seed}
        max_tokens = min(cfg.max_new_tokens, cfg.teacher_context - count_tokens(prompt) - ERROR_MARGIN)
        if max_tokens <= 0:
            return "too_long", base
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        try:
            resp = teacher.chat(messages, max_tokens=max_tokens, n=1, temperature=cfg.temperature,
                                seed=cfg.seed + s.lang_index)
        except TeacherError as e:
            if e.status in (400, 413, 422):  # this request is refused (e.g. too long for the teacher): recorded
                return "refused", dict(base, error=str(e))
            raise
        choice = (resp.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or ""
        fp = resp.get("system_fingerprint")
        if choice.get("finish_reason") != "stop":
            return "not_stop", dict(base, finish_reason=choice.get("finish_reason"), response=text)
        parsed = parse_problem_solution(text)
        if parsed is None:
            return "unparsable", dict(base, response=text)
        problem, solution = parsed
        if not problem or not solution:
            return "empty", dict(base, response=text)
        return "ok", dict(base, openai_fingerprint=fp, problem=problem, solution=solution)

    return work


OUTCOMES = ("ok", "not_stop", "unparsable", "empty", "too_long", "refused")


# ---------------------------------------------------------------------------------------------- clean
def remove_all_whitespace(text: str) -> str:
    return "".join(text.split())


def clean(rows: list[dict], *, shuffle_seed: int = 666) -> tuple[list[dict], list[dict], dict]:
    """Magicoder's cleaning: rows (each with ``seed`` and either ``problem``/``solution`` or a raw ``response``
    that is parsed) are shuffled with ``random.seed(shuffle_seed)``, then a row is rejected if its seed, problem
    or solution with all whitespace removed was already seen (first occurrence wins). Returns
    ``(kept, rejected with reason, counts)``."""
    rng = random.Random(shuffle_seed)
    rows = list(rows)
    rng.shuffle(rows)
    seeds: set[str] = set()
    problems: set[str] = set()
    solutions: set[str] = set()
    kept, rejected = [], []
    counts = {"input": len(rows), "unparsable": 0, "empty": 0, "duplicate seeds": 0, "duplicate problems": 0,
              "duplicate solutions": 0}
    for d in rows:
        if "problem" not in d or "solution" not in d:
            parsed = parse_problem_solution(d.get("response", ""))
            if parsed is None:
                counts["unparsable"] += 1
                rejected.append(dict(d, reason="unparsable"))
                continue
            d = {k: v for k, v in d.items() if k != "response"}
            d["problem"], d["solution"] = parsed
        if not d["problem"] or not d["solution"]:
            counts["empty"] += 1
            rejected.append(dict(d, reason="empty"))
            continue
        s, p, sol = (remove_all_whitespace(d[k]) for k in ("seed", "problem", "solution"))
        reason = ("duplicate seeds" if s in seeds else "duplicate problems" if p in problems
                  else "duplicate solutions" if sol in solutions else None)
        if reason is not None:
            counts[reason] += 1
            rejected.append(dict(d, reason=reason))
            continue
        seeds.add(s)
        problems.add(p)
        solutions.add(sol)
        kept.append(d)
    counts["kept"] = len(kept)
    return kept, rejected, counts


def run_oss_instruct(sources: list[str], output: str, teacher_cfg, cfg: OSSConfig, *, lang: str | None = None,
                     content_key: str = "content", lang_key: str = "lang", quotas: dict[str, int] | None = None,
                     default_quota: int | None = None, count_tokenizer: str | None = None,
                     shard: tuple[int, int] = (0, 1), concurrency: int = 8, progress: bool = True) -> dict:
    """Generate (or continue generating) OSS-Instruct data into ``output`` (see resumable.py for the files).
    Returns counts: this run's outcomes, what earlier runs had written, and whether the shard is complete."""
    import hashlib

    from megaocto.instruct.resumable import ResumableOutput, fingerprint, in_shard, shard_path
    from megaocto.instruct.runner import run_items
    from megaocto.instruct.teacher import Teacher

    def docs():
        for src in sources:
            yield from read_documents(src, content_key=content_key, lang_key=lang_key, lang=lang)

    seeds = build_seeds(docs(), seed=cfg.seed, min_lines=cfg.min_lines, max_lines=cfg.max_lines,
                        chunk_size=cfg.chunk_size, max_considered=cfg.max_considered, quotas=quotas,
                        default_quota=default_quota)
    count, counter_name = token_counter(count_tokenizer, teacher_cfg.model)
    # the corpus enters the fingerprint through the seeds themselves (content, not paths)
    corpus = hashlib.sha256("\0".join(f"{s.lang}\1{s.raw_index}\1{s.seed}" for s in seeds).encode()).hexdigest()
    settings = {**dataclasses.asdict(cfg), "teacher_model": teacher_cfg.model, "prompt": PROMPT_TEMPLATE,
                "system": SYSTEM, "error_margin": ERROR_MARGIN, "corpus": corpus, "token_counter": counter_name,
                "shard": list(shard)}
    path = shard_path(output, shard)
    out = ResumableOutput(path, fingerprint("oss-instruct", settings), settings, shard)
    mine = [s for s in seeds if in_shard(s.index, shard)]
    todo = [s for s in mine if s.index not in out.done]
    teacher = Teacher(teacher_cfg, max_connections=max(concurrency, 1))
    try:
        counts = run_items(todo, len(todo), make_work(teacher, cfg, count), out, concurrency=concurrency,
                           desc="oss-instruct", progress=progress, outcomes=OUTCOMES)
    finally:
        complete = out.close(s.index for s in mine)
        teacher.close()
    return {"output": path, "seeds": len(mine), "resumed": out.resumed_kept + out.resumed_rejected,
            "outcomes": dict(counts), "retries": teacher.retries, "complete": complete}
