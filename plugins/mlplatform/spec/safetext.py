"""Spec text may not carry template syntax or control characters.

Spec strings reach places that render or display text: Airflow's templated operator fields and notifier
messages (Jinja, with ``conn``, ``var`` and ``macros`` in the context), the UI, alert e-mails and webhook
messages, logs. The notifiers pass spec text as template *values*; this is the spec-side bound, so a spec
never holds template source in the first place. Checked for every string of a spec (keys too) by the
loader, and by the models' free-text fields.

- Jinja openers ``{{``, ``{%``, ``{#`` (also ``{`` + whitespace-control ``-``/``+`` variants, which start
  with the same two characters) and a trailing ``{`` (which would join a ``{``, ``%`` or ``#`` that follows
  the value in a template into an opener);
- control characters (C0 except tab and newline, DEL, C1), Unicode line and paragraph separators, and
  bidirectional overrides/isolates (they make text display differently from what runs or what is logged).
"""

from __future__ import annotations

import re
from typing import Any

_JINJA = re.compile(r"\{[{%#]|\{\Z")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_NEWLINE = re.compile("[\t\n]")

TEMPLATE_WHY = ("template syntax is not allowed in specs: {found!r} starts a Jinja expression, statement or comment, "
                "and spec text reaches templated task fields and alert messages; write the text without "
                "'{{{{', '{{%' or '{{#'")


def text_problem(value: str, multiline: bool = True) -> str | None:
    """Why ``value`` may not appear in a spec, or None."""
    m = _JINJA.search(value)
    if m:
        return TEMPLATE_WHY.format(found=value[m.start():m.start() + 2])
    if not multiline and _NEWLINE.search(value):
        return "line breaks and tabs are not allowed in this field: it is shown on one line in the UI, logs and alerts"
    m = _CONTROL.search(value)
    if m:
        return (f"control character U+{ord(m.group()):04X} is not allowed in specs: spec text is shown in the UI, "
                "logs and alerts, where control and direction characters disguise what it says")
    return None


def check_text(value: str) -> str:
    """Pydantic validator for multi-line free text (descriptions)."""
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def check_line(value: str | None) -> str | None:
    """Pydantic validator for one-line free text (owner, data source, connection id)."""
    if value is None:
        return value
    problem = text_problem(value, multiline=False)
    if problem:
        raise ValueError(problem)
    return value


def find_unsafe_text(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    """(path, message) for every string (value or key) of ``data`` with template syntax or control characters."""
    found: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            problem = text_problem(str(key))
            if problem:
                found.append((path + (key,), "key: " + problem))
            found.extend(find_unsafe_text(value, path + (key,)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(find_unsafe_text(value, path + (i,)))
    elif isinstance(data, str):
        problem = text_problem(data)
        if problem:
            found.append((path, problem))
    return found
