"""CommitPackFT filters (bigcode octopack ``commitpackft_filters1.py`` then ``commitpackft_filters2.py``) as
named rules applied in order. A rule either drops the row (returns True) or rewrites ``subject`` in place
(the two ``clean-*`` rules, which never drop). ``filter_commits`` streams jsonl → jsonl and counts drops per rule.

Deviations from upstream, on purpose: the 90% "Bump" drop is keyed on ``(seed, row)`` (upstream used an
unseeded ``random.random()``), and the extension rule compares extensions without the leading dot (upstream's
dotted map matched nothing for the dotted languages).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from megaocto.config.base import ConfigError, field

# The CommitPackFT output columns (commitpackft_filters1.py select_columns), in order: filter-commits requires
# every one (a row missing `lang` or `repos` is a bad row, not a row written without them) and writes only these.
COMMITPACKFT_COLUMNS = ("commit", "old_file", "new_file", "old_contents", "new_contents", "subject", "message",
                        "lang", "license", "repos")


def _resource(name: str) -> str:
    return resources.files("megaocto").joinpath("resources", name).read_text(encoding="utf-8")


def load_good_starts() -> tuple[str, ...]:
    """GOOD_STARTS_EN (resource file), each with the trailing space upstream adds."""
    words = [w.strip() for w in _resource("commitpackft_good_starts_en.txt").splitlines()]
    return tuple(w + " " for w in words if w and not w.startswith("#"))


BAD_MESSAGE = frozenset({"readme", "update", "dummy", "updated", "test", "update readme", "update readme.md",
                         "updated readme.md", "updated readme"})
BAD_SUB_MESSAGE = ("auto commit", "update contributing", "<?xml", "merge branch", "merge pull request",
                   "signed-off-by")
SILLY_MESSAGES = frozenset({"fix that bug where things didn't work but now they should",
                            "put the thingie in the thingie", "add a beter commit message"})
# Upstream LANG_TO_EXTENSIONS (keys: lowercased CommitPack language), compared here without the dot.
LANG_TO_EXTENSIONS = {"python": ("py",), "java": ("java",), "javascript": ("js",), "rust": ("rs",), "go": ("go",),
                      "c++": ("cpp",), "c": ("c", "h"), "html": ("html",), "shell": ("sh", "bash", "zsh", "csh",
                      "slurm"), "xml": ("xml",)}
_VERSION_RE = re.compile(r"(?:v)?\d+\.\d+\.\d+(?=$|\S)")
_HASH_RE = re.compile(r"^[a-f0-9]+(?:-[a-f0-9]+)*$")
_SHA_RE = re.compile(r"[a-f0-9]{40}")
_ISSUE_RE = re.compile(r"issue\s*\d+|bug\s*\d+|feature\s*\d+", re.IGNORECASE)


@dataclass
class FilterConfig:
    seed: int = field(0, "Seed of the reproducible 90% drop of 'Bump'/'Set version'/'Update version' subjects.")
    bump_drop_prob: float = field(0.9, "Probability that a version-bump subject is dropped (upstream: 0.9).")
    tokenizer: str | None = field(None, "Tokenizer for the token-length rule (StarCoder's in CommitPackFT).")
    min_tokens: int = field(50, "token-length: minimum tokens of old_contents + '<|endoftext|>' + new_contents.")
    max_tokens: int = field(768, "token-length: maximum tokens (upstream starcoder setting).")
    max_old_chars: int = field(50_000, "old-too-long: drop rows whose old_contents has at least this many chars.")
    rules: list | None = field(None, "Rule names to apply (in canonical order); None = all.")
    skip_rules: list | None = field(None, "Rule names to leave out (e.g. ['token-length'] without a tokenizer).")
    on_error: str = field("fail", "Malformed input rows: 'fail' (file:line: reason) or 'skip' and count.")


@dataclass
class RuleContext:
    cfg: FilterConfig
    good_starts: tuple
    tokenizer: object | None
    row: int = 0  # global 0-based input line index (stable key for the seeded drop)


@dataclass(frozen=True)
class Rule:
    name: str
    source: str
    doc: str
    fn: Callable[[dict, RuleContext], bool]  # True = drop


def _clean_refs(row, ctx):
    subject = row["subject"]
    if not subject:
        return False
    words = subject.strip().replace("[skip ci]", "").strip().split()
    if words and words[0].startswith("[") and words[0].endswith("]"):
        words = words[1:]
    if words and words[0].endswith(":"):
        words = words[1:]
    if words and words[-1].startswith("[") and words[-1].endswith("]"):
        words = words[:-1]
    row["subject"] = " ".join(words).strip()
    return False


def _clean_ci_skip(row, ctx):
    row["subject"] = row["subject"].replace("[ci skip]", "").strip()
    return False


def _subject_length(row, ctx):
    s = row["subject"]
    return not (10 < len(s) < 1000 and 4 < len(s.split()) < 1000)


def _extension(row, ctx):
    name = row["new_file"].split("/")[-1]
    exts = LANG_TO_EXTENSIONS.get(row["lang"].lower())
    parts = name.split(".")
    if exts:
        return not (len(parts) > 1 and parts[-1] in exts)
    return len(parts) < 2


def _filename_in_subject(row, ctx):
    parts = row["new_file"].split("/")[-1].split(".")
    return len(parts) >= 2 and parts[-2] in row["subject"]


def _token_length(row, ctx):
    n = len(ctx.tokenizer.encode(row["old_contents"] + "<|endoftext|>" + row["new_contents"]))
    return not (ctx.cfg.min_tokens <= n <= ctx.cfg.max_tokens)


def _bump(row, ctx):
    if not row["subject"].startswith(("Bump", "Set version", "Update version")):
        return False
    h = hashlib.blake2b(f"{ctx.cfg.seed}:{ctx.row}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < ctx.cfg.bump_drop_prob


RULES: tuple[Rule, ...] = (
    Rule("old-too-long", "filters1", "len(old_contents) >= max_old_chars (50k)",
         lambda r, c: len(r["old_contents"]) >= c.cfg.max_old_chars),
    Rule("empty-new", "filters1", "new_contents is empty", lambda r, c: len(r["new_contents"]) == 0),
    Rule("unchanged", "filters1", "old_contents == new_contents", lambda r, c: r["old_contents"] == r["new_contents"]),
    Rule("hash-in-subject", "filters1", "'#' anywhere in subject (issue refs)", lambda r, c: "#" in r["subject"]),
    Rule("extension", "filters1", "file extension must match the language (or the name must have a dot)",
         _extension),
    Rule("filename-in-subject", "filters1", "file-name stem appears in subject", _filename_in_subject),
    Rule("subject-length", "filters1", "keep 10 < chars < 1000 and 4 < words < 1000", _subject_length),
    Rule("clean-subject", "filters1", "strip '[skip ci]', a leading [tag] / 'word:', a trailing [tag]", _clean_refs),
    Rule("subject-length-cleaned", "filters1", "subject-length again after cleaning", _subject_length),
    Rule("capitalized", "filters1", "subject must start with an uppercase letter",
         lambda r, c: not r["subject"].strip()[:1].isupper()),
    Rule("token-length", "filters1", "min_tokens <= len(tok(old + '<|endoftext|>' + new)) <= max_tokens",
         _token_length),
    Rule("good-start", "filters1", "lowercased subject starts with an imperative verb (GOOD_STARTS_EN)",
         lambda r, c: not r["subject"].lower().startswith(c.good_starts)),
    Rule("bad-message", "filters1", "lowercased subject is exactly a BAD_MESSAGE ('update', 'readme', ...)",
         lambda r, c: r["subject"].lower() in BAD_MESSAGE),
    Rule("bad-sub-message", "filters1", "contains 'merge branch', 'signed-off-by', ...",
         lambda r, c: any(b in r["subject"].lower() for b in BAD_SUB_MESSAGE)),
    Rule("version-subject", "filters1", "starts like a version (v1.2.3)",
         lambda r, c: _VERSION_RE.match(r["subject"].lower()) is not None),
    Rule("hash-subject", "filters1", "subject is a hex hash like 0239-2a41",
         lambda r, c: _HASH_RE.match(r["subject"].lower()) is not None),
    Rule("cherry-pick", "filters2", "'cherry picked from commit' in subject",
         lambda r, c: "cherry picked from commit" in r["subject"]),
    Rule("sha-in-subject", "filters2", "a 40-hex commit sha in subject", lambda r, c: _SHA_RE.search(r["subject"])
         is not None),
    Rule("clean-ci-skip", "filters2", "remove '[ci skip]' and strip", _clean_ci_skip),
    Rule("bump", "filters2", "drop 90% of 'Bump'/'Set version'/'Update version' subjects, keyed on (seed, row)",
         _bump),
    Rule("first-person", "filters2", "' i ', \"i've\" or \"i'm\" in the lowercased subject",
         lambda r, c: any(w in r["subject"].lower() for w in (" i ", "i've", "i'm"))),
    Rule("thanks-to", "filters2", "'thanks to' (lowercased) and 'for' (case-sensitive) in subject",
         lambda r, c: "thanks to" in r["subject"].lower() and "for" in r["subject"]),
    Rule("code-review", "filters2", "'code review' in subject", lambda r, c: "code review" in r["subject"].lower()),
    Rule("silly-message", "filters2", "one of three joke messages", lambda r, c: r["subject"].lower() in
         SILLY_MESSAGES),
    Rule("issue-ref", "filters2", "issue/bug/feature followed by a number",
         lambda r, c: _ISSUE_RE.search(r["subject"]) is not None),
    Rule("cdpcp", "filters2", "'cdpcp' in subject", lambda r, c: "cdpcp" in r["subject"].lower()),
    Rule("codereview-url", "filters2", "'//codereview' in subject", lambda r, c: "//codereview" in
         r["subject"].lower()),
    Rule("wip", "filters2", "'work in progress' or 'wip' substring (also hits 'wipe', as upstream)",
         lambda r, c: "work in progress" in r["subject"].lower() or "wip" in r["subject"].lower()),
    Rule("url", "filters2", "'http://' or 'https://' in subject",
         lambda r, c: "https://" in r["subject"].lower() or "http://" in r["subject"].lower()),
    Rule("leetcode", "filters2", "'| leetcode' in subject", lambda r, c: "| leetcode" in r["subject"].lower()),
    Rule("few-words", "filters2", "fewer than 4 words", lambda r, c: len(r["subject"].split()) < 4),
)
RULE_NAMES = tuple(r.name for r in RULES)
LOW_YIELD_RATIO = 0.01  # filter-commits notes which rules dropped the most when it keeps less than this


def select_rules(cfg: FilterConfig) -> tuple[Rule, ...]:
    for names in (cfg.rules or [], cfg.skip_rules or []):
        unknown = [n for n in names if n not in RULE_NAMES]
        if unknown:
            raise ConfigError(f"unknown filter rule(s) {unknown}; rules are: {', '.join(RULE_NAMES)}")
    chosen = [r for r in RULES if (cfg.rules is None or r.name in cfg.rules) and r.name not in (cfg.skip_rules or [])]
    if any(r.name == "token-length" for r in chosen) and not cfg.tokenizer:
        raise ConfigError("the token-length rule needs a tokenizer: pass --tokenizer (CommitPackFT used StarCoder's)"
                          " or --skip-rules token-length")
    return tuple(chosen)


class CommitFilter:
    """Apply the selected rules to rows one at a time; ``counts[name]`` = rows that rule dropped."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.rules = select_rules(cfg)
        tok = None
        if cfg.tokenizer:
            from megaocto.data.tokenizer import load_tokenizer
            tok = load_tokenizer(cfg.tokenizer)
        self.ctx = RuleContext(cfg, load_good_starts(), tok)
        self.counts: Counter = Counter()
        self.seen = 0
        self.kept = 0

    def __call__(self, row: dict, index: int) -> dict | None:
        """The (possibly cleaned) row, or None when a rule drops it. ``index`` keys the seeded drop."""
        self.seen += 1
        self.ctx.row = index
        for rule in self.rules:
            if rule.fn(row, self.ctx):
                self.counts[rule.name] += 1
                return None
        self.kept += 1
        return row

    def low_yield_note(self, ratio: float = LOW_YIELD_RATIO, top: int = 3) -> str | None:
        """A note when fewer than ``ratio`` of the rows were kept: the rules that dropped the most, and how to
        relax them. None otherwise."""
        if not self.seen or self.kept >= ratio * self.seen:
            return None
        worst = [(n, c) for n, c in self.counts.most_common() if c][:top]
        rules = ", ".join(f"{n} {c} ({100 * c / self.seen:.0f}%)" for n, c in worst)
        return (f"note: kept {self.kept} of {self.seen} rows ({100 * self.kept / self.seen:.1f}%); the rules that "
                f"dropped the most: {rules}. This is upstream CommitPackFT behaviour (its filters keep a small "
                f"fraction of CommitPack); relax them with --skip-rules {' '.join(n for n, _ in worst)} "
                f"(--list-rules describes each)")

    def report(self) -> str:
        lines = [f"{'rule':24s} {'dropped':>8s} {'left':>8s}", f"{'(input)':24s} {'':>8s} {self.seen:8d}"]
        left = self.seen
        for r in self.rules:
            left -= self.counts[r.name]
            lines.append(f"{r.name:24s} {self.counts[r.name]:8d} {left:8d}")
        return "\n".join(lines)


def filter_commits(inputs: list[str], output: str, cfg: FilterConfig, log=None) -> CommitFilter:
    """Stream CommitPack jsonl ``inputs`` through the rules into ``output``; returns the filter (counts, stats).

    Every input row must hold the ten CommitPackFT columns as strings (else it is a bad row: ``--on-error``);
    the output rows hold exactly those columns, in that order (other keys of the input are not copied).
    A row whose strings cannot be written as UTF-8 (a lone surrogate) is a bad row too, never a crash.
    """
    from megaocto.data.jsonl import BadRowError, JsonlReader, UnencodableRowError, encode_row

    log = log if log is not None else (lambda m: print(m, file=sys.stderr))
    filt = CommitFilter(cfg)
    reader = JsonlReader(inputs, COMMITPACKFT_COLUMNS, cfg.on_error)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for row in reader:
                # Key = global 0-based input line (bad rows count too), stable under --on-error.
                kept = filt(row.data, reader.lines_seen - 1)
                if kept is None:
                    continue
                try:
                    line = encode_row({k: kept[k] for k in COMMITPACKFT_COLUMNS})
                except UnencodableRowError as e:
                    err = BadRowError(row.path, row.line, e.category, str(e))
                    if cfg.on_error == "fail":
                        raise err from None
                    reader.stats.skip(err)
                    reader.stats.rows_ok -= 1
                    filt.kept -= 1
                    continue
                out.write(line)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, BadRowError):
            e.stats = reader.stats  # rows read up to the bad row, for the summary the command prints
        raise
    os.replace(tmp, output)
    filt.stats = reader.stats
    return filt
