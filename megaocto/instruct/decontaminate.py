"""Decontamination as bigcode-dataset / Magicoder do it, with one Aho-Corasick automaton instead of a loop.

Rule (Magicoder ``decontamination/find_substrings.py``): a row's chosen columns are lower-cased and joined with
``"\\n\\n"``; the row is removed when any lower-cased benchmark string occurs in it as a substring. The reported
reason is ``<benchmark>_match`` with the matched string of the first benchmark (in the order given) and, within
it, the first string in list order that occurs — the same one upstream's nested loop reports. Benchmark strings
are stripped and empty ones dropped (as upstream's ``load_dataset_column``).

Benchmark strings (:func:`humaneval_strings`, :func:`humanevalpack_strings`, :func:`jsonl_strings`):

* HumanEval docstrings, cut from the prompt between the triple quotes (the 2nd string of 2, the 4th of 4
  triple-double-quotes, or between two triple-single-quotes), and canonical solutions except the generic ones
  upstream keeps (``HUMAN_EVAL_STRINGS_OK``; upstream's fourth entry is written ``"return " ".join(strings)"``, which
  Python concatenates to ``"return .join(strings)"``, so the join solution is in fact filtered; kept as is).
* HumanEvalPack: the ``docstring`` and ``canonical_solution`` of every language (same generic exclusion).
* Any jsonl benchmark with named fields (MBPP ``text``/``code``, GSM8K ``question``, APPS ``question``, DS-1000
  prompts): ``NAME=FILE:field[,field...]``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable

from megaocto.data.jsonl import write_jsonl_row

# upstream's list, byte for byte (see the module doc for the fourth entry)
HUMAN_EVAL_STRINGS_OK = ["return x + y", "return len(string)", "return n**2", "return " ".join(strings)"]


def extract_docstring(prompt: str) -> str:
    """The docstring of a HumanEval prompt (upstream's rule); ValueError when the prompt has no such docstring."""
    if '"""' in prompt:
        parts = prompt.split('"""')
        if prompt.count('"""') == 2:
            return parts[1].strip()
        if prompt.count('"""') == 4:
            return parts[3].strip()
        raise ValueError(f"prompt has {prompt.count(chr(34) * 3)} triple quotes")
    if "'''" in prompt and prompt.count("'''") == 2:
        return prompt.split("'''")[1].strip()
    raise ValueError("prompt has no docstring")


def _clean(strings: Iterable[str], *, generic_ok: bool = False) -> list[str]:
    out = []
    for s in strings:
        s = s.strip()
        if s and not (generic_ok and s in HUMAN_EVAL_STRINGS_OK):
            out.append(s)
    return out


def humaneval_strings(problems: list[dict]) -> dict[str, list[str]]:
    """``{"humaneval_docstrings", "humaneval_solutions"}`` from HumanEval rows (``prompt``, ``canonical_solution``;
    HumanEvalPack's python rows have both)."""
    return {"humaneval_docstrings": _clean(extract_docstring(p["prompt"]) for p in problems),
            "humaneval_solutions": _clean((p["canonical_solution"] for p in problems), generic_ok=True)}


def humanevalpack_strings(by_lang: dict[str, list[dict]]) -> dict[str, list[str]]:
    """``{"humanevalpack_docstrings", "humanevalpack_solutions"}`` over every language given."""
    docs = _clean(p["docstring"] for lang in by_lang for p in by_lang[lang])
    sols = _clean((p["canonical_solution"] for lang in by_lang for p in by_lang[lang]), generic_ok=True)
    return {"humanevalpack_docstrings": docs, "humanevalpack_solutions": sols}


def jsonl_strings(spec: str) -> tuple[str, list[str]]:
    """``NAME=FILE:field[,field...]`` → ``(NAME, strings)`` (every row's fields, stripped, empty ones dropped)."""
    from megaocto.instruct.io import read_jsonl

    name, sep, rest = spec.partition("=")
    path, sep2, fields = rest.rpartition(":")
    if not sep or not sep2 or not name or not path or not fields:
        raise ValueError(f"--benchmark must be NAME=FILE:field[,field...], e.g. mbpp=mbpp.jsonl:text,code "
                         f"(got {spec!r})")
    keys = [f for f in fields.split(",") if f]
    strings = []
    for row in read_jsonl(path, keys):
        for k in keys:
            value = row[k]
            if not isinstance(value, str):
                raise ValueError(f"{path}: field {k!r} is not a string")
            strings.append(value)
    return name, _clean(strings)


@dataclasses.dataclass
class Match:
    benchmark: str
    substring: str


class Decontaminator:
    """All benchmark strings in one Aho-Corasick automaton (pyahocorasick); :meth:`find` gives the upstream match."""

    def __init__(self, benchmarks: dict[str, list[str]]):
        import ahocorasick

        self.benchmarks = benchmarks
        self.names = list(benchmarks)
        self.automaton = ahocorasick.Automaton()
        self.num_patterns = 0
        for b, name in enumerate(self.names):
            for i, s in enumerate(benchmarks[name]):
                key = s.lower()
                rank = (b, i)
                old = self.automaton.get(key, None)
                if old is None or rank < old[0]:
                    self.automaton.add_word(key, (rank, name, s))
                    self.num_patterns += old is None
        if self.num_patterns:
            self.automaton.make_automaton()

    def find(self, text: str) -> Match | None:
        """The first benchmark match (upstream's order) in ``text`` (already lower-cased and joined), or None."""
        if not self.num_patterns:
            return None
        best = None
        for _, value in self.automaton.iter(text):
            if best is None or value[0] < best[0]:
                best = value
        return None if best is None else Match(best[1], best[2])

    def row_text(self, row: dict, columns: list[str]) -> str:
        return "\n\n".join(row[c].lower() for c in columns)


def naive_find(text: str, benchmarks: dict[str, list[str]]) -> Match | None:
    """Upstream's loop (the reference, and the baseline of bench/decontam_bench.py)."""
    for name, strings in benchmarks.items():
        for s in strings:
            if s.lower() in text:
                return Match(name, s)
    return None


def load_benchmarks(*, humanevalpack: str | None = None, humanevalpack_langs: Iterable[str] | None = None,
                    humaneval: str | None = None, extra: Iterable[str] = ()) -> dict[str, list[str]]:
    """The benchmark strings: HumanEval (``humaneval`` jsonl, else HumanEvalPack's python rows), HumanEvalPack
    (``humanevalpack``: a directory of ``<lang>.jsonl``; None = ``$MEGAOCTO_HUMANEVALPACK`` / the hub, as
    megaocto eval), and every ``NAME=FILE:fields`` of ``extra``."""
    from megaocto.eval.humanevalpack import LANGUAGES, load_problems
    from megaocto.instruct.io import read_jsonl

    langs = list(humanevalpack_langs or LANGUAGES)
    pack = {lang: load_problems(lang, humanevalpack) for lang in langs}
    if humaneval is not None:
        he = list(read_jsonl(humaneval, ("prompt", "canonical_solution")))
    elif "python" in pack:
        he = pack["python"]
    else:
        he = load_problems("python", humanevalpack)
    out = {**humaneval_strings(he), **humanevalpack_strings(pack)}
    for spec in extra:
        name, strings = jsonl_strings(spec)
        if name in out:
            raise ValueError(f"--benchmark {name}: the name is already used ({', '.join(out)})")
        out[name] = strings
    return out


def decontaminate_file(inputs: list[str], columns: list[str], benchmarks: dict[str, list[str]], output: str,
                       removed: str | None = None) -> dict:
    """Write the rows of ``inputs`` without a benchmark match to ``output`` (and the removed ones, with
    ``filter_reason`` and ``matched_substring``, to ``removed``). Returns the report: rows, kept, removed per
    benchmark, strings per benchmark, and up to 5 example matches per benchmark."""
    import json

    from megaocto.instruct.io import read_jsonl

    dec = Decontaminator(benchmarks)
    per_bench = {name: 0 for name in benchmarks}
    examples: dict[str, list] = {name: [] for name in benchmarks}
    rows = kept = 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp_out = output + ".tmp"
    tmp_rm = (removed + ".tmp") if removed else None
    with open(tmp_out, "w", encoding="utf-8") as fo, \
            (open(tmp_rm, "w", encoding="utf-8") if tmp_rm else open(os.devnull, "w")) as fr:
        for path in inputs:
            for row in read_jsonl(path, columns):
                rows += 1
                bad = [c for c in columns if not isinstance(row[c], str)]
                if bad:
                    raise ValueError(f"{path}: row {rows}: column {bad[0]!r} is not a string")
                m = dec.find(dec.row_text(row, columns))
                if m is None:
                    kept += 1
                    write_jsonl_row(fo, row)  # read through read_jsonl: its strings are valid
                    continue
                per_bench[m.benchmark] += 1
                if len(examples[m.benchmark]) < 5:
                    examples[m.benchmark].append(m.substring[:200])
                write_jsonl_row(fr, {**row, "filter_reason": f"{m.benchmark}_match", "matched_substring": m.substring})
    os.replace(tmp_out, output)
    if tmp_rm:
        os.replace(tmp_rm, removed)
    return {"rows": rows, "kept": kept, "removed": rows - kept, "removed_per_benchmark": per_bench,
            "strings_per_benchmark": {k: len(v) for k, v in benchmarks.items()}, "example_matches": examples}
