"""Per-tenant bearer tokens for the gateway.

The gateway never stores tokens, only their SHA-256 hex digests, in a JSON tokens file:

    {"acme": ["<sha256 hex of token>", ...], "globex": "<sha256 hex>", "*": ["<platform token digest>"]}

A request for ``/v1/models/<tenant>/<pipeline>`` must carry ``Authorization: Bearer <token>`` whose digest
is listed under ``<tenant>`` (or under ``"*"``, the platform team's tokens). Missing token: 401; a token of
another tenant: 403. ``python -m mlplatform.serving token <tenant>`` prints a new token and adds its
digest to the file. The embedded canary gateway of the deploy stage runs without auth (loopback, ephemeral
port, lives for one task).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path

from fastapi import HTTPException

PLATFORM = "*"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenAuth:
    def __init__(self, digests: dict[str, list[str]]):
        self.digests = {tenant: [d.lower() for d in ds] for tenant, ds in digests.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuth:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object {{tenant: [sha256 hex, ...]}}")
        digests = {}
        for tenant, value in raw.items():
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) and len(v) == 64 for v in values):
                raise ValueError(f"{path}: {tenant!r} must map to SHA-256 hex digests (64 characters)")
            digests[tenant] = values
        return cls(digests)

    def check(self, tenant: str, authorization: str | None) -> None:
        """Raise 401/403 unless ``authorization`` is a bearer token of ``tenant`` or of the platform."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        got = digest(authorization[7:].strip())
        allowed = self.digests.get(tenant, []) + self.digests.get(PLATFORM, [])
        # Compare against every digest so timing does not tell which tenant's list matched.
        ok = False
        for candidate in allowed:
            ok |= hmac.compare_digest(candidate, got)
        if not ok:
            raise HTTPException(403, f"this token may not use tenant {tenant!r}'s models")


def add_token(path: str | Path, tenant: str, token: str | None = None) -> str:
    """Store the digest of ``token`` (a new random one by default) for ``tenant`` in the tokens file and return
    the token (shown once). Storing a token that is already there changes nothing."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    token = token or secrets.token_urlsafe(32)
    existing = data.get(tenant, [])
    existing = [existing] if isinstance(existing, str) else existing
    if digest(token) not in existing:
        data[tenant] = existing + [digest(token)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        path.chmod(0o600)
    return token
