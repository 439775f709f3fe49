"""Row → text formats for preprocessing. Each format names the jsonl keys it needs and the outputs it writes.

Two-sided formats write ``inputs`` and ``targets`` from ONE row in ONE pass (``P_inputs_document`` /
``P_targets_document``), so document k of both files is always the same row; a row whose side is empty is a
bad row (error or skip), never silently dropped from one side only. EOD goes at the end of the last output
(``text`` / ``targets``).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

MAGICODER_SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently delivers accurate "
                    "and reliable responses to user instructions.")
MAGICODER_OSS_PREFIX = "Write a solution to the following coding problem:\n"


class FormatError(ValueError):
    """A row cannot be rendered (e.g. an empty side); ``category`` is the counted skip reason."""

    def __init__(self, category: str, detail: str = ""):
        self.category, self.detail = category, detail
        super().__init__(f"{category}{': ' + detail if detail else ''}")


@dataclass(frozen=True)
class Format:
    name: str
    doc: str
    roles: tuple[str, ...]        # what the builder needs, in order (mapped to json keys)
    default_keys: tuple[str, ...]  # default json key per role
    outputs: tuple[str, ...]       # output dataset keys (P_{output}_document)
    template: str                  # human-readable template (docs / --help)
    build: Callable[..., tuple[str, ...]]  # build(*values) -> one text per output
    eod_on_all: bool = False       # EOD after every output (text) or only after the last (pairs)


def magicoder_prompt(instruction: str, response: str = "") -> str:
    """Magicoder's training/inference template; with ``response=""`` it ends in ``"@@ Response\\n"``."""
    return f"{MAGICODER_SYSTEM}\n\n@@ Instruction\n{instruction}\n\n@@ Response\n{response}"


def octocoder_question(question: str) -> str:
    """The input side of OctoCoder's finetuning text ``"Question: {q}\\n\\nAnswer: {a}"`` (octopack
    finetuning/starcoder/finetune.py, whose targets-only dataset tokenizes ``"Question: " + q + "\\n\\nAnswer: "``
    apart from the answer). The ``qa`` (OASST) and ``commits-finetune`` (CommitPackFT) formats both use it."""
    return f"Question: {question}\n\nAnswer: "


def number_lines(code: str) -> str:
    """``f"{i+1:3d} {line}"`` for every line of ``code.strip()``, each line keeping its own line ending (CRLF
    stays CRLF), joined as they were: octopack finetuning/santacoder/finetune.py ``generate_line_diff``
    (``splitlines(keepends=True)``, ``"".join``; OctoPack appendix H)."""
    return "".join(f"{i + 1:3d} {line}" for i, line in enumerate(code.strip().splitlines(keepends=True)))


def line_diff(old: str, new: str) -> str:
    """Numbered line diff (OctoPack appendix H): only the ``-``/``+`` lines of a unified diff of the
    numbered old/new code (split into lines without their endings, as upstream), hunk headers and context
    dropped, joined with ``\\n``."""
    diff = difflib.unified_diff(number_lines(old).splitlines(), number_lines(new).splitlines(),
                                fromfile="Original", tofile="Modified", lineterm="")
    body = list(diff)[2:]
    return "\n".join(line for line in body if line.startswith(("+", "-")))


def _commits_pretrain(old, subject, new):
    return (f"<commit_before>{old}<commit_msg>{subject}<commit_after>{new}",)


def _commits_finetune(old, subject, new):
    # OctoCoder's CommitPackFT rows: prompt = subject + "\n" + old_contents, completion = new_contents
    # (octopack dataset/oasst/add_commitpackft.py), rendered in the OASST question/answer text.
    return (octocoder_question(f"{subject}\n{old}"), new)


def _commits_linediff(old, subject, new):
    diff = line_diff(old, new)
    if not diff and old != new:
        # number_lines strips the file and splits lines (as upstream), so a valid commit that only changes
        # whitespace at the start/end of the file (or line endings) has no line diff: a bad row, named as such.
        raise FormatError("empty line diff", "only leading/trailing whitespace (or line endings) changed, which "
                                             "the numbered line diff strips; re-run with --on-error skip to skip "
                                             "and count such commits")
    # upstream: input=numbered_old.rstrip(), instruction=subject.strip()
    return (f"<commit_before>\n{number_lines(old).rstrip()}\n<commit_msg>\n{subject.strip()}\n<commit_after>\n",
            diff)


def _qa(question, answer):
    return (octocoder_question(question), answer)


def _magicoder(problem, solution):
    return (magicoder_prompt(MAGICODER_OSS_PREFIX + problem), solution)


def _instruction_response(instruction, response):
    return (magicoder_prompt(instruction), response)


_COMMIT_ROLES = ("old_contents", "subject", "new_contents")

FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("text", "json key(s) as is, one output per key (Megatron --json-keys K [K2 ...])", ("text",),
           ("text",), ("text",), "{text}", lambda *t: t, eod_on_all=True),
    Format("commits-pretrain", "SantaCoderPack / StarCoder commit pretraining text", _COMMIT_ROLES, _COMMIT_ROLES,
           ("text",), "<commit_before>{old_contents}<commit_msg>{subject}<commit_after>{new_contents}",
           _commits_pretrain),
    Format("commits-finetune", "OctoCoder commit instruction (commit message in the input)", _COMMIT_ROLES,
           _COMMIT_ROLES, ("inputs", "targets"),
           "inputs: Question: {subject}\\n{old_contents}\\n\\nAnswer:  | targets: {new_contents}",
           _commits_finetune),
    Format("commits-linediff", "numbered line-diff targets (OctoPack appendix H, SantaCoder --line_diff)",
           _COMMIT_ROLES, _COMMIT_ROLES, ("inputs", "targets"),
           "inputs: <commit_before>\\n{numbered old, line endings kept}\\n<commit_msg>\\n{subject stripped}\\n"
           "<commit_after>\\n | "
           "targets: {-/+ lines of the numbered diff}", _commits_linediff),
    Format("qa", "OctoCoder / OASST question-answer", ("question", "answer"), ("prompt", "completion"),
           ("inputs", "targets"), "inputs: Question: {question}\\n\\nAnswer:  | targets: {answer}", _qa),
    Format("magicoder", "Magicoder OSS-Instruct problem/solution", ("problem", "solution"),
           ("problem", "solution"), ("inputs", "targets"),
           "inputs: {MAGICODER_PROMPT with instruction = 'Write a solution to the following coding problem:\\n'"
           " + problem, empty response} | targets: {solution}", _magicoder),
    Format("instruction-response", "Evol-Instruct instruction/response in the Magicoder template",
           ("instruction", "response"), ("instruction", "response"), ("inputs", "targets"),
           "inputs: {MAGICODER_PROMPT with instruction, empty response} | targets: {response}",
           _instruction_response),
]}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def resolve_keys(fmt: Format, json_key=None, key_map: dict[str, str] | None = None) -> tuple[str, ...]:
    """JSON key per role: defaults, ``key_map`` {role: key} overrides; for ``text``, ``json_key`` (a key or a
    list of keys, each its own output)."""
    if fmt.name == "text" and json_key is not None and not isinstance(json_key, str):
        keys = tuple(json_key)
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"--json-key needs distinct keys, got {list(keys)}")
        return keys
    key_map = dict(key_map or {})
    unknown = set(key_map) - set(fmt.roles)
    if unknown:
        raise ValueError(f"format {fmt.name!r} has no role(s) {sorted(unknown)}; its roles are {list(fmt.roles)}")
    if json_key is not None and fmt.name == "text":
        key_map.setdefault("text", json_key)
    return tuple(key_map.get(r, d) for r, d in zip(fmt.roles, fmt.default_keys))


def output_names(fmt: Format, keys: tuple[str, ...]) -> tuple[str, ...]:
    """Output dataset keys; the ``text`` format is named after its json key (Megatron: P_{key}_document)."""
    return keys if fmt.name == "text" else fmt.outputs


def render(fmt: Format, row: dict, keys: tuple[str, ...]) -> tuple[str, ...]:
    """Texts for one row (keys are validated strings); raises FormatError for an empty output."""
    texts = fmt.build(*(row[k] for k in keys))
    names = output_names(fmt, keys)
    for name, t in zip(names, texts):
        if not t:
            raise FormatError(f"empty {name}", f"format {fmt.name} produced an empty {name}")
    return texts
