"""Find literal secrets in a spec: specs name Airflow connections, they never hold credentials.

Two checks, over every key and string of a spec:

- **key names** that hold credentials (camelCase, kebab and snake case alike): ``password``/``passwd``/
  ``pwd``/``pw``/``pass``, ``secret``, ``token``, ``auth``/``authorization``, ``bearer``, ``credential(s)``,
  ``passphrase``, ``jwt``, ``cookie``, ``dsn``, and ``<x>_key`` for api/access/secret/private/account/
  signing/encryption/session/master/ssh/client keys, ``client_secret``, ``connection_string``; a non-empty
  scalar under such a key is reported;
- **value formats** anywhere in a string: provider tokens (AWS, GitHub, GitLab, Slack, Google API and
  OAuth, Stripe, OpenAI/Anthropic, npm, PyPI, Hugging Face, SendGrid, Shopify, DigitalOcean, Databricks,
  Twilio, Telegram, Discord/Slack webhooks), JSON web tokens, private-key blocks, Azure connection strings
  (``AccountKey=``, ``SharedAccessKey=``, SAS ``sig=``), URLs with a password, HTTP ``Basic``/``Bearer``
  credentials and ``password=...``/``token: ...`` pairs written inside a string.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

# Last word(s) of a key, after splitting camelCase, '-', '_', '.' and spaces into lower-case words.
_SECRET_WORDS = {"password", "passwords", "passwd", "passwds", "pwd", "pwds", "pw", "pass", "passphrase", "secret",
                 "secrets", "token", "tokens", "auth", "authorization", "bearer", "credential", "credentials",
                 "creds", "jwt", "cookie", "cookies", "dsn", "apikey", "apikeys", "privatekey", "accesskey",
                 "secretkey", "pat"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("account", "key"),
                 ("signing", "key"), ("encryption", "key"), ("session", "key"), ("master", "key"), ("ssh", "key"),
                 ("client", "key"), ("client", "secret"), ("connection", "string"), ("conn", "str"),
                 ("shared", "key"), ("sas", "key"), ("api", "keys"), ("access", "keys")}
_SECRET_TRIPLES = {("access", "key", "id"), ("secret", "access", "key"), ("service", "account", "key")}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+")


def secret_key(key: str) -> bool:
    """True when a key's name says its value is a credential (``db_pw``, ``apiToken``, ``client-secret``...)."""
    words = [w for w in _WORD_SPLIT.split(_CAMEL.sub("_", key).lower()) if w]
    if not words:
        return False
    return words[-1] in _SECRET_WORDS or tuple(words[-2:]) in _SECRET_PAIRS or tuple(words[-3:]) in _SECRET_TRIPLES


_B64 = r"[A-Za-z0-9+/]"
_TOKEN_CHARS = r"[A-Za-z0-9_-]"
_SECRET_VALUES = [
    (r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b", "an AWS access key id"),
    (r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----", "a private key"),
    (r"\bxox[abposre]-[A-Za-z0-9-]{10,}", "a Slack token"),
    (r"\bxapp-\d-[A-Za-z0-9-]{10,}", "a Slack app token"),
    (r"hooks\.slack\.com/(services|workflows|triggers)/[A-Za-z0-9/_-]{20,}", "a Slack webhook URL"),
    (r"discord(app)?\.com/api/webhooks/\d+/[A-Za-z0-9_-]{20,}", "a Discord webhook URL"),
    (r"\bgh[pousr]_[A-Za-z0-9]{20,}", "a GitHub token"),
    (r"\bgithub_pat_[A-Za-z0-9_]{22,}", "a GitHub token"),
    (r"\bgl(pat|dt|rt|ptt|cbt|imt|oas|ft|soat|agent)-[A-Za-z0-9_-]{20,}", "a GitLab token"),
    (r"\bAIza[0-9A-Za-z_-]{30,}", "a Google API key"),
    (r"\bya29\.[0-9A-Za-z_-]{20,}", "a Google OAuth access token"),
    (r"\b1//0[0-9A-Za-z_-]{30,}", "a Google OAuth refresh token"),
    (r"\b(sk|rk)_(live|test)_[0-9A-Za-z]{16,}", "a Stripe secret key"),
    (r"\bwhsec_[0-9A-Za-z]{20,}", "a Stripe webhook secret"),
    (r"\bsk-[A-Za-z0-9_-]{20,}", "an API secret key"),
    (r"\bnpm_[A-Za-z0-9]{30,}", "an npm token"),
    (r"\bpypi-[A-Za-z0-9_-]{32,}", "a PyPI token"),
    (r"\b(hf|api_org)_[A-Za-z0-9]{30,}", "a Hugging Face token"),
    (r"\bSG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}", "a SendGrid API key"),
    (r"\bshp(at|ss|ca|pa)_[a-fA-F0-9]{32}", "a Shopify token"),
    (r"\bdo[por]_v1_[a-f0-9]{64}", "a DigitalOcean token"),
    (r"\bdapi[a-f0-9]{32}", "a Databricks token"),
    (r"\bSK[0-9a-fA-F]{32}\b", "a Twilio API key"),
    (r"\b\d{8,10}:AA[A-Za-z0-9_-]{33}\b", "a Telegram bot token"),
    (r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.", "a JSON web token"),
    (r"(?i)\b(AccountKey|SharedAccessKey|SharedAccessSignature)\s*=\s*[A-Za-z0-9+/%=]{16,}", "an Azure storage key"),
    (r"(?i)[?&]sig=[A-Za-z0-9%+/=]{20,}", "an Azure SAS signature"),
    (r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", "a URL with a password in it"),
    (rf"(?i)\bbearer\s+(?=[A-Za-z0-9._~+/-]*\d)(?=[A-Za-z0-9._~+/-]*[A-Za-z])[A-Za-z0-9._~+/-]{{16,}}=*", "a bearer token"),
    (r"(?i)(?<![A-Za-z0-9_.-])(?:[A-Za-z0-9]+[_.-])*(password|passwd|pwd|pass|passphrase|secret|token|apikey"
     r"|api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|account[_-]?key|client[_-]?secret)\s*[=:]\s*(?![<${*]|x{3,}\b|(true|false|none|null|yes|no)\b)[^\s&;,'\"]{4,}",
     "a credential written as key=value"),
]
_SECRET_VALUES = [(f"(?i:{p[4:]})" if p.startswith("(?i)") else p, what) for p, what in _SECRET_VALUES]  # scoped flags
_PATTERNS = [(re.compile(p), what) for p, what in _SECRET_VALUES]
_ANY_SECRET = re.compile("|".join(f"(?:{p})" for p, _ in _SECRET_VALUES))
_BASIC = re.compile(rf"(?i)\bbasic\s+({_B64}{{8,}}={{0,2}})")
HINT = "store it in an Airflow connection the platform team allows for your tenant and name the connection id"


def _basic_credentials(text: str) -> bool:
    """``Basic <base64 of user:password>`` (checked by decoding, so "Basic classification" is not one)."""
    for m in _BASIC.finditer(text):
        token = m.group(1)
        try:
            decoded = base64.b64decode(token + "=" * (-len(token) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if ":" in decoded and decoded.isprintable():
            return True
    return False


def value_secret(text: str) -> str | None:
    """What kind of credential ``text`` holds, or None."""
    if _ANY_SECRET.search(text):  # one scan; name the kind only on a hit
        for pattern, what in _PATTERNS:
            if pattern.search(text):
                return what
    if "asic" in text.lower() and _basic_credentials(text):
        return "HTTP basic credentials"
    return None


# For redacting error messages: the key=value form only with "=", since the messages' own words ("a GitHub
# token: store it ...") would match "token:".
_REDACT = re.compile("|".join(f"(?:{p})" for p, _ in _SECRET_VALUES[:-1])
                     + "|(?:" + _SECRET_VALUES[-1][0].replace(r"\s*[=:]\s*", r"\s*=\s*") + ")")


def redact(text: str) -> str:
    """``text`` with every credential-shaped part replaced by ``<redacted>`` (errors never echo a secret)."""
    if not _REDACT.search(text) and not ("asic" in text.lower() and _basic_credentials(text)):
        return text
    text = _REDACT.sub("<redacted>", text)
    return _BASIC.sub(lambda m: "Basic <redacted>" if _basic_credentials(m.group(0)) else m.group(0), text)


def _holds_value(value: Any) -> bool:
    """A non-empty scalar, or a list holding one (``passwords: [a, b]``); mappings are searched instead."""
    if isinstance(value, list):
        return any(_holds_value(v) for v in value)
    return isinstance(value, str | int | float) and not isinstance(value, bool) and value != ""


def find_secrets(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    """(path, message) for every value that looks like a credential."""
    found: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            sub = path + (key,)
            what = value_secret(str(key))
            if what:  # a credential used as a key
                found.append((sub, f"key looks like {what}: {HINT}"))
            elif secret_key(str(key)) and _holds_value(value):
                found.append((sub, f"{key!r} looks like a secret written into the spec: {HINT}"))
            else:
                found.extend(find_secrets(value, sub))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(find_secrets(value, path + (i,)))
    elif isinstance(data, str):
        what = value_secret(data)
        if what:
            found.append((path, f"value looks like {what}: {HINT}"))
    return found
