"""``builtin:pydoc-qa``: prompt/response pairs derived offline from this Python's own docs.

Two sources, both shipped with every CPython, so fine-tuning tests and the demo need no
download:

- every section of the pydoc topic texts (``pydoc_data.topics``, the corpus of
  ``builtin:pydoc-topics``): the section title is the prompt (``The "assert" statement``), the
  first prose paragraph under it is the response;
- every public name of ``builtins``: ``builtins.len`` is the prompt, the first paragraph of its
  docstring that is not a call signature is the response.

A record carries the pair under every field name a format reads by default (``prompt`` /
``response`` for ``--format sft``, ``source`` / ``target`` for ``--format pairs``) and as one
``text`` for ``--format text``. The content depends on the Python version, like the other
builtin corpora.
"""

from __future__ import annotations

import builtins
import inspect
import re
from collections.abc import Iterator

# A section title is a line followed by an underline of the same length (reST).
_TITLE = re.compile(r"^(?P<title>\S[^\n]*)\n(?P<rule>[*=\-~^]+)$", re.MULTILINE)
_NOT_PROSE = ("New in version", "Changed in version", "Added in version", "Deprecated",
              "See also", "Note:")
MAX_RESPONSE_CHARS = 600  # a first paragraph longer than this is not a short answer


def _first_paragraph(body: str, skip_prefix: str = "") -> str | None:
    """The first paragraph of prose: not indented (grammar, code), not a version note."""
    for block in re.split(r"\n\s*\n", body):
        lines = block.strip("\n").splitlines()
        if not lines or lines[0][:1].isspace() or not lines[0].strip():
            continue
        text = " ".join(line.strip() for line in lines)
        if text.startswith(_NOT_PROSE) or (skip_prefix and text.startswith(skip_prefix)):
            continue
        if "->" in text.split(".")[0] or not text.endswith("."):
            continue  # a signature line, or a lead-in to a code block ("... as follows:")
        if len(text) > MAX_RESPONSE_CHARS or len(text) < 20:
            return None
        return re.sub(r"\s+", " ", text)
    return None


def _topic_pairs() -> Iterator[tuple[str, str, str]]:
    from pydoc_data.topics import topics  # 0.5 MB of text, only for this corpus

    for key in sorted(topics):
        text = topics[key]
        titles = [m for m in _TITLE.finditer(text) if len(m["rule"]) == len(m["title"])]
        for i, m in enumerate(titles):
            end = titles[i + 1].start() if i + 1 < len(titles) else len(text)
            answer = _first_paragraph(text[m.end():end])
            if answer is not None:
                yield f"pydoc-qa/topics/{key}/{i}", m["title"].strip(), answer


def _builtin_pairs() -> Iterator[tuple[str, str, str]]:
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not (inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        answer = _first_paragraph(inspect.getdoc(obj) or "", skip_prefix=f"{name}(")
        if answer is not None:
            yield f"pydoc-qa/builtins/{name}", f"builtins.{name}", answer


def pydoc_qa() -> Iterator[tuple[str, dict[str, str]]]:
    """(id, record) of every pair, in a fixed order. A prompt that comes again (a statement
    has its own topic and a section in "compound") is kept once, so no pair is in both splits."""
    seen: set[str] = set()
    for doc_id, prompt, answer in [*_topic_pairs(), *_builtin_pairs()]:
        if prompt in seen:
            continue
        seen.add(prompt)
        yield doc_id, {"prompt": prompt, "response": answer, "source": prompt,
                       "target": answer, "text": f"{prompt}\n{answer}"}
