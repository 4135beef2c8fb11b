"""The keys a fleet's routers present to its own replicas, and the refusal of placeholder secrets.

Routers and replicas of one fleet share a secret (`FLEET_INTERNAL_SECRET`). A router presents
`replica_key(secret, id)` to the replica registered as `id`, and that replica accepts only the
key of its own id (unlimited: the client's limits were taken at the router). Whoever manages to
register a fake replica thus learns a key that opens nothing but itself, and engines registered
by hand (vLLM, SGLang) get no key at all. Both sides import this module; they never import each
other.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from urllib.parse import urlsplit

INTERNAL_SECRET_ENV = "FLEET_INTERNAL_SECRET"
REPLICA_KEY_PREFIX = "sk-fleet-replica-"
# What deploy/k8s/secrets.yaml ships with; a process that still sees it refuses to start.
PLACEHOLDER = "REPLACE-ME"


def replica_key(secret: str, replica_id: str) -> str:
    """HMAC-SHA256 of the replica's id under the fleet's secret (domain-separated)."""
    mac = hmac.new(
        secret.encode(), b"fleetserve-replica-key\0" + replica_id.encode(), hashlib.sha256
    )
    return REPLICA_KEY_PREFIX + mac.hexdigest()


def is_replica_key(presented: str | None, secret: str | None, replica_id: str | None) -> bool:
    """Constant-time check that `presented` is the key of `replica_id`."""
    if not presented or not secret or not replica_id:
        return False
    return hmac.compare_digest(presented.encode(), replica_key(secret, replica_id).encode())


class PlaceholderSecret(ValueError):
    """A secret still holds the manifests' placeholder value."""


def refuse_placeholders(**values: str | None) -> None:
    """Raise PlaceholderSecret naming the first setting (keyword = its env name) that still holds
    the placeholder; Redis URLs are checked for it in their password."""
    for name, value in values.items():
        if not value:
            continue
        secret = urlsplit(value).password or "" if "://" in value else value
        if PLACEHOLDER in secret:
            raise PlaceholderSecret(
                f"{name} still holds the placeholder from deploy/k8s/secrets.yaml; "
                "set a real secret (e.g. `openssl rand -hex 32`)"
            )


def exit_on_placeholders(prog: str, **values: str | None) -> None:
    """A server's first step: one clear line and exit status 2 when a secret is a placeholder."""
    try:
        refuse_placeholders(**values)
    except PlaceholderSecret as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
