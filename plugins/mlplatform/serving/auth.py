"""Per-tenant bearer tokens for the gateway.

The gateway never stores tokens, only their SHA-256 hex digests, in a JSON tokens file:

    {"acme": ["<sha256 hex of token>", ...], "globex": "<sha256 hex>", "*": ["<platform token digest>"]}

A request for ``/v1/models/<tenant>/<pipeline>`` must carry ``Authorization: Bearer <token>`` whose digest
is listed under ``<tenant>`` (or under ``"*"``, the platform team's tokens). Missing or unknown token: 401; a
token of another tenant: 403. ``/v1/routes`` and ``/metrics`` need a token too: the platform's token sees every
model, a tenant's token only that tenant's. The gateway's ``Guard`` middleware checks all of this from the
headers, before a byte of the body is read. ``python -m mlplatform.serving token <tenant>`` prints a new
token and adds its digest to the file. The embedded canary gateway of the deploy stage runs without auth (loopback, ephemeral
port, lives for one task).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException

PLATFORM = "*"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AuthError(Exception):
    """A refused request: ``status`` (401 or 403) and a message that names nothing the caller did not send."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class Principal:
    """Who a request is: the platform (every tenant) or the tenants its token is listed under."""

    tenants: frozenset[str] = frozenset()
    platform: bool = False

    def may_use(self, tenant: str) -> bool:
        return self.platform or tenant in self.tenants

    def sees(self, model_name: str) -> bool:
        """Whether ``<tenant>.<pipeline>`` belongs to this principal."""
        return self.may_use(model_name.partition(".")[0])


PLATFORM_PRINCIPAL = Principal(platform=True)  # a gateway without auth (embedded, loopback) serves the platform
ANONYMOUS = Principal()


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip() or None


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

    def identify(self, authorization: str | None) -> Principal:
        """The principal of a bearer token; AuthError 401 when it is missing or unknown."""
        token = bearer(authorization)
        if token is None:
            raise AuthError(401, "a bearer token is required")
        got = digest(token)
        tenants = set()
        # Compare against every digest of every tenant so timing does not tell which list matched.
        for tenant, candidates in self.digests.items():
            for candidate in candidates:
                if hmac.compare_digest(candidate, got):
                    tenants.add(tenant)
        if not tenants:
            raise AuthError(401, "the bearer token is not valid")
        return Principal(frozenset(tenants - {PLATFORM}), PLATFORM in tenants)

    def check(self, tenant: str, authorization: str | None) -> None:
        """Raise 401/403 unless ``authorization`` is a bearer token of ``tenant`` or of the platform."""
        try:
            principal = self.identify(authorization)
        except AuthError as exc:
            raise HTTPException(exc.status, exc.detail, headers={"WWW-Authenticate": "Bearer"}) from None
        if not principal.may_use(tenant):
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
