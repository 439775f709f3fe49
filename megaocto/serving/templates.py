"""Chat templates: OpenAI ``messages`` → one prompt in the model's instruction format.

* ``magicoder`` (Magicoder / InverseCoder, megaocto's ``instruction-response`` and ``magicoder`` formats): the
  system sentence (or the request's own system message), then per turn ``@@ Instruction\\n{user}\\n\\n@@ Response\\n``
  followed by the assistant's answer; the prompt ends in ``"@@ Response\\n"`` (Magicoder's inference prompt).
* ``octocoder`` (OctoPack, megaocto's ``qa`` format): ``Question: {user}\\n\\nAnswer: {assistant}`` turns joined by
  blank lines; an optional system message is put first, followed by a blank line; the prompt ends in
  ``"Answer:"``.
* ``plain``: the message contents joined by newlines (a base model).

The chosen template comes from ``megaocto serve --chat-template`` or else the checkpoint's metadata
(``chat_template``, or the ``data.format`` the model was fine-tuned with).
"""
from __future__ import annotations

from megaocto.data.formats import MAGICODER_SYSTEM

TEMPLATES = ("magicoder", "octocoder", "plain")

# data.format of the fine-tuning run -> chat template
_FORMAT_TEMPLATES = {"instruction-response": "magicoder", "magicoder": "magicoder", "qa": "octocoder",
                     "commits-finetune": "octocoder"}


class TemplateError(ValueError):
    """The messages cannot be rendered (bad role order, unknown template)."""


def template_from_metadata(meta: dict) -> str:
    """The chat template named by checkpoint metadata: ``chat_template`` or the fine-tuning ``data.format``;
    ``plain`` when neither says."""
    if meta.get("chat_template") in TEMPLATES:
        return meta["chat_template"]
    fmt = ((meta.get("config") or {}).get("data") or {}).get("format")
    return _FORMAT_TEMPLATES.get(fmt, "plain")


def _turns(messages: list[dict]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system, [(user, assistant or None), ...]); the last turn's assistant is None (what is asked for)."""
    system = None
    msgs = list(messages)
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
    turns: list[tuple[str, str | None]] = []
    for k, m in enumerate(msgs):
        role = m["role"]
        if role == "system":
            raise TemplateError(f"messages[{k + (system is not None)}]: a system message is only allowed first")
        want = "user" if k % 2 == 0 else "assistant"
        if role != want:
            raise TemplateError(f"messages[{k + (system is not None)}]: expected role '{want}' (user and assistant "
                                f"must alternate, starting with user), got '{role}'")
        if role == "user":
            turns.append((m["content"], None))
        else:
            turns[-1] = (turns[-1][0], m["content"])
    if not turns:
        raise TemplateError("messages: at least one user message is needed")
    if turns[-1][1] is not None:
        raise TemplateError("messages: the last message must be from the user")
    return system, turns


def render_chat(messages: list[dict], template: str) -> str:
    """The prompt for ``messages`` (each ``{"role", "content"}``, contents strings) in ``template``."""
    if template not in TEMPLATES:
        raise TemplateError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if template == "plain":
        return "\n".join(m["content"] for m in messages)
    system, turns = _turns(messages)
    if template == "magicoder":
        parts = [MAGICODER_SYSTEM if system is None else system]
        for user, answer in turns:
            parts.append(f"@@ Instruction\n{user}")
            parts.append(f"@@ Response\n{answer if answer is not None else ''}")
        return "\n\n".join(parts)
    parts = [] if system is None else [system]
    for user, answer in turns:
        parts.append(f"Question: {user}")
        parts.append("Answer:" if answer is None else f"Answer: {answer}")
    return "\n\n".join(parts)
