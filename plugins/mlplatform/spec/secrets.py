"""Find literal secrets in a spec: specs name Airflow connections, they never hold credentials."""

from __future__ import annotations

import re
from typing import Any

_SECRET_KEYS = re.compile(r"(pass(word|wd)?|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)$", re.I)
_SECRET_VALUES = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), "a Slack token"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"), "a GitHub token"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "an API secret key"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\."), "a JSON web token"),
    (re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"), "a URL with a password in it"),
]
_ANY_SECRET = re.compile("|".join(f"(?:{p.pattern})" for p, _ in _SECRET_VALUES))
HINT = "store it in an Airflow connection the platform team allows for your tenant and name the connection id"


def find_secrets(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    """(path, message) for every value that looks like a credential."""
    found: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            sub = path + (key,)
            if _SECRET_KEYS.search(str(key)) and isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                found.append((sub, f"{key!r} looks like a secret written into the spec: {HINT}"))
            else:
                found.extend(find_secrets(value, sub))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(find_secrets(value, path + (i,)))
    elif isinstance(data, str) and _ANY_SECRET.search(data):  # one scan; name the kind only on a hit
        for pattern, what in _SECRET_VALUES:
            if pattern.search(data):
                found.append((path, f"value looks like {what}: {HINT}"))
                break
    return found
