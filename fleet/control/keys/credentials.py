"""Secrets of API keys and of the admin API: minting them, hashing them, checking a bearer token.

Only SHA-256 digests of secrets are stored; digests are compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from fleet.control.errors import APIError

ADMIN_KEY_ENV = "FLEET_ADMIN_KEY"
SECRET_PREFIX = "sk-"


def new_secret() -> str:
    """`sk-` and 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def new_admin_key() -> str:
    return SECRET_PREFIX + "admin-" + secrets.token_urlsafe(32)


def admin_key_from_env() -> str | None:
    return os.environ.get(ADMIN_KEY_ENV) or None


def is_admin_key(presented: str | None, expected: str | None) -> bool:
    """Constant-time check (digests of equal length are compared, whatever the inputs' lengths)."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(hash_secret(presented), hash_secret(expected))


def require_admin(authorization: str | None, expected: str | None) -> None:
    """Raise the right APIError unless the `Authorization` header carries the admin key."""
    if not expected:
        raise APIError(
            403, "The admin API is disabled: no admin key is set.", code="admin_disabled"
        )
    if not is_admin_key(bearer_token(authorization), expected):
        raise APIError(401, "A valid admin key is required.", code="invalid_admin_key")
