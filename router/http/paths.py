"""What a request path means, decided on one canonical spelling of it.

Routes are matched on the decoded, normalised path, the way nginx matches locations: percent
escapes decoded once, repeated slashes merged, dot segments resolved. Otherwise
`/v1/%63ompletions` or `/replicas/r1/v1%2Fcompletions` would miss the generation routes (and
their limits) yet still reach a replica that decodes them. A path that still holds an escape
after one decoding (double encoding) or a control character is refused.

A pinned request (`/replicas/{id}/<path>`) may reach only the OpenAI routes of its replica, never
its internal ones (`/load`, `/metrics`): those answer the router's internal key.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from fleet.control.errors import APIError

PINNED_PREFIX = "/replicas/"
_SLASHES = re.compile(r"/{2,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Pinned routes: path -> (method, route kind the router gives it).
PINNED_ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/completions": ("POST", "completions"),
    "/v1/embeddings": ("POST", "embeddings"),
    "/tokenize": ("POST", "tokenize"),
    "/detokenize": ("POST", "detokenize"),
    "/v1/models": ("GET", "models"),
    "/health": ("GET", "health"),
}
_MODEL_CARD = "/v1/models/"


def needs_canonical(path: str) -> bool:
    """Cheap test for the data path: only these spellings can differ from their canonical form."""
    return "%" in path or "//" in path or "/." in path


def canonical(path: str) -> str:
    """The path as routes are matched on; APIError 400 for paths no route could mean."""
    try:
        decoded = unquote(path, errors="strict") if "%" in path else path
    except UnicodeDecodeError:
        decoded = "%"  # an escape that is not UTF-8
    if "%" in decoded or _CONTROL.search(decoded):
        raise APIError(400, "The request path is not valid: it is encoded twice or holds controls.")
    decoded = _SLASHES.sub("/", decoded)
    if "/." in decoded:
        trailing = decoded.endswith("/")
        decoded = posixpath.normpath(decoded)
        if trailing and decoded != "/":
            decoded += "/"
    return decoded if decoded.startswith("/") else "/" + decoded


@dataclass(frozen=True, slots=True)
class PinnedTarget:
    replica_id: str
    kind: str  # chat, completions, embeddings, tokenize, detokenize, models, health
    method: str  # what is sent to the replica
    path: str  # canonical, re-encoded for the wire


def pinned_target(path: str, method: str) -> PinnedTarget:
    """`/replicas/{id}/<rest>` (canonical) to what the replica is asked; 404/405 for the rest."""
    tail = path[len(PINNED_PREFIX) :]
    replica_id, slash, rest = tail.partition("/")
    rest = "/" + rest.rstrip("/") if slash else "/"
    if rest.startswith(_MODEL_CARD) and len(rest) > len(_MODEL_CARD):
        allowed, kind = "GET", "models"
        wire = _MODEL_CARD + quote(rest[len(_MODEL_CARD) :], safe="/")
    elif rest in PINNED_ROUTES:
        allowed, kind = PINNED_ROUTES[rest]
        wire = rest
    else:
        raise APIError(
            404,
            f"No pinned route {rest!r:.100}: a replica's pinned routes are "
            + ", ".join(sorted(PINNED_ROUTES))
            + " and /v1/models/{model}.",
            code="route_not_found",
        )
    if method == allowed or (method == "HEAD" and allowed == "GET"):
        return PinnedTarget(replica_id, kind, allowed, wire)
    raise APIError(
        405, f"Method {method:.16} is not allowed on {rest}.", headers={"Allow": allowed}
    )
