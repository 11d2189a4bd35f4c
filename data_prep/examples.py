"""Fine-tuning examples: what a record of an SFT or pairs corpus becomes before tokenization.

A record becomes a list of *pieces*, ``(text, carries_loss)``. Each piece is tokenized on its
own and the pieces are stored back to back with an EOT after the last one (tokenize.py), so a
piece boundary is always a token boundary and the loss mask (docs/token-store.md) is exact.

- ``--format sft``: a record is either a chat (``--messages-field``, default ``messages``: a list
  of ``{role, content}`` with roles system, user, assistant) or a prompt/response pair
  (``--prompt-field`` / ``--response-field``), which is the chat ``[user: prompt, assistant:
  response]``. The chat is rendered through a named template (``TEMPLATES``): every message is
  ``prefix + content + suffix`` of its role. Assistant contents and suffixes carry loss (the
  model learns to answer and to end its turn), everything else does not.
- ``--format pairs``: ``[(source, no loss), (target, loss)]``, for the encoder-decoder; no
  template (the source goes to the encoder as it is).

Bad records are not errors here: the parser returns the reason, and the builder skips, counts
and logs it (or stops on it under ``--strict``). A reason's text before `` (`` is its counting
key, so ``unknown role (message 3: 'bot')`` is counted as ``unknown role``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

FORMATS = ("text", "sft", "pairs")
ROLES = ("system", "user", "assistant")

Piece = tuple[str, bool]  # (text, carries loss)


@dataclass(frozen=True)
class Template:
    """How a chat becomes text: ``prefix + content + suffix`` per message, by role."""

    name: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    description: str = ""

    def affixes(self, role: str) -> tuple[str, str]:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]

    def render(self, messages: Sequence[dict[str, str]]) -> list[Piece]:
        """The pieces of a (validated) conversation; empty pieces are left out."""
        pieces: list[Piece] = []
        for m in messages:
            prefix, suffix = self.affixes(m["role"])
            loss = m["role"] == "assistant"
            pieces += [(prefix, False), (m["content"], loss), (suffix, loss)]
        return [p for p in pieces if p[0]]

    def prompt(self, text: str) -> list[Piece]:
        """What the model is given to answer ``text`` as a user turn (``zeroforge sample``):
        exactly the pieces that precede the response in a training example."""
        user_prefix, user_suffix = self.user
        return [p for p in ((user_prefix, False), (text, False), (user_suffix, False),
                            (self.assistant[0], False)) if p[0]]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("description")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Template:
        return cls(d["name"], tuple(d["system"]), tuple(d["user"]), tuple(d["assistant"]))


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("plain", system=("", "\n\n"), user=("", "\n"), assistant=("", "\n"),
             description="the prompt, a newline, the response, a newline"),
    Template("chat", system=("System: ", "\n"), user=("User: ", "\n"),
             assistant=("Assistant: ", "\n"),
             description="'User: ...' / 'Assistant: ...' lines, one per turn"),
    Template("instruct", system=("", "\n\n"), user=("### Instruction:\n", "\n\n"),
             assistant=("### Response:\n", "\n\n"),
             description="Alpaca-style '### Instruction:' and '### Response:' blocks"),
)}


@dataclass(frozen=True)
class ExampleOptions:
    """How records become examples (``--format`` and its fields). Part of the store's
    configuration hash only when the format is not ``text``, so text stores are unchanged."""

    format: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    source_field: str = "source"
    target_field: str = "target"
    template: str = "plain"
    # Longest stored example, EOT included (sft), or longest side (pairs: the source, and the
    # target with its EOT); longer examples are skipped. 1024: GPT-2's context.
    max_tokens: int = 1024

    @property
    def is_examples(self) -> bool:
        return self.format != "text"

    def validate(self) -> list[str]:
        problems = []
        if self.format not in FORMATS:
            problems.append(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.template not in TEMPLATES:
            problems.append(f"--template must be one of {', '.join(TEMPLATES)}, "
                            f"got {self.template!r}")
        if self.max_tokens < 2:
            problems.append(f"--max-tokens must be at least 2, got {self.max_tokens}")
        names = ("prompt_field", "response_field", "messages_field", "source_field",
                 "target_field")
        problems += [f"--{n.replace('_', '-')} must not be empty" for n in names
                     if not getattr(self, n)]
        return problems

    def fields(self) -> list[str]:
        """The record fields this format reads (Parquet column selection)."""
        if self.format == "sft":
            return [self.messages_field, self.prompt_field, self.response_field]
        return [self.source_field, self.target_field]

    def describe(self) -> dict[str, Any]:
        """The store's ``examples`` attribute: format, fields, template (in full)."""
        out: dict[str, Any] = {"format": self.format, "max_tokens": self.max_tokens}
        if self.format == "sft":
            out["fields"] = {"prompt": self.prompt_field, "response": self.response_field,
                             "messages": self.messages_field}
            out["template"] = TEMPLATES[self.template].to_json()
        else:
            out["fields"] = {"source": self.source_field, "target": self.target_field}
            out["template"] = None
        return out


def _string_field(obj: dict, name: str, where: str = "") -> tuple[str | None, str | None]:
    """(value, None) or (None, reason) for a required non-empty string field; ``where`` names
    the message inside a conversation."""
    at = f" ({where})" if where else ""
    if name not in obj:
        return None, f"missing field {name!r}{at}"
    value = obj[name]
    if value is None:
        return None, f"field {name!r} is null{at}"
    if not isinstance(value, str):
        return None, f"field {name!r} is not a string ({type(value).__name__}" + \
            (f", {where})" if where else ")")
    if not value.strip():
        return None, f"empty field {name!r}{at}"
    return value, None


def _messages(raw: Any, field: str) -> tuple[list[dict[str, str]] | None, str | None]:
    if not isinstance(raw, list):
        return None, f"field {field!r} is not a list ({type(raw).__name__})"
    if not raw:
        return None, "empty conversation"
    out = []
    for i, m in enumerate(raw, 1):
        where = f"message {i}"
        if not isinstance(m, dict):
            return None, f"message is not an object ({where}: {type(m).__name__})"
        role, why = _string_field(m, "role", where)
        if why:
            return None, why
        if role not in ROLES:
            return None, f"unknown role (message {i}: {role!r}; known: {', '.join(ROLES)})"
        content, why = _string_field(m, "content", where)
        if why:
            return None, why
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        return None, "conversation without an assistant turn"
    if out[0]["role"] == "assistant":  # nothing to answer: the first token would carry loss
        return None, "conversation starts with an assistant turn"
    if out[-1]["role"] != "assistant":
        return None, "conversation does not end with an assistant turn"
    return out, None


def parse_example(obj: dict, opts: ExampleOptions) -> tuple[list[Piece] | None, str | None]:
    """(pieces, None) for a good record, (None, reason) for a bad one."""
    if opts.format == "pairs":
        source, why = _string_field(obj, opts.source_field)
        if why:
            return None, why
        target, why = _string_field(obj, opts.target_field)
        if why:
            return None, why
        return [(source, False), (target, True)], None
    template = TEMPLATES[opts.template]
    if opts.messages_field in obj:
        messages, why = _messages(obj[opts.messages_field], opts.messages_field)
    else:
        prompt, why = _string_field(obj, opts.prompt_field)
        response, why2 = _string_field(obj, opts.response_field) if not why else (None, None)
        why = why or why2
        messages = None if why else [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": response}]
    if why:
        return None, why
    return template.render(messages), None
