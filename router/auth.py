"""Who may call the router, and within which limits: the control plane's KeyStore when the fleet
has Redis, a fixed list of `--api-key`s without it, or nobody checked when neither is given."""

from __future__ import annotations

from collections.abc import Callable

from fleet.control.errors import APIError
from fleet.control.keys import KeyRecord, KeyStore, Ticket, bearer_token, hash_secret

VERIFIED_CACHE = 1024


class Gate:
    """Static keys are kept as SHA-256 digests: a presented key is hashed and looked up once,
    which takes the same time whichever key (if any) it matches; Authorization headers that
    matched are remembered so that clients reusing a key skip parsing and hashing. So are the
    digests of fleet keys' headers (the store still checks each request's record)."""

    def __init__(
        self, store: KeyStore | None = None, static_keys: list[str] | tuple[str, ...] = ()
    ) -> None:
        self.store = store
        self.static_keys = frozenset(hash_secret(k) for k in static_keys)
        self._verified: set[str] = set()
        self._digests: dict[str, str] = {}  # Authorization header -> its fleet key's digest

    @property
    def open(self) -> bool:
        return self.store is None and not self.static_keys

    def check_static(self, authorization: str | None) -> bool:
        """True when the caller holds one of the static keys (or none is needed); without a key
        store, anything else is APIError 401. No I/O: the data path calls it inline."""
        if self.open or authorization in self._verified:
            return True
        if self.static_keys:
            token = bearer_token(authorization)
            if token is not None and hash_secret(token) in self.static_keys:
                if len(self._verified) < VERIFIED_CACHE:
                    self._verified.add(authorization)  # type: ignore[arg-type]
                return True
        if self.store is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return False

    async def authenticate(self, authorization: str | None, model: str | None) -> KeyRecord | None:
        """The caller's key record (None for static keys and open routers), or APIError 401/403/503."""
        if self.check_static(authorization):
            return None
        assert self.store is not None
        return await self.store.authenticate(bearer_token(authorization), model)

    def known(self, authorization: str | None) -> KeyRecord | None:
        """A fleet key this router knows, checked without I/O (APIError 401); None when it must
        be looked up in Redis (`authenticate`)."""
        assert self.store is not None
        digest = self._digests.get(authorization)  # type: ignore[arg-type]
        if digest is not None:
            return self.store.known_digest(digest)
        token = bearer_token(authorization)
        if not token:
            return self.store.known(token)  # 401: no key
        digest = hash_secret(token)
        record = self.store.known_digest(digest)
        if record is not None and len(self._digests) < VERIFIED_CACHE:
            self._digests[authorization] = digest  # type: ignore[index]  # only keys it knows
        return record

    def admit_soon(
        self, record: KeyRecord, reserve_tokens: int, done: Callable[[Ticket | APIError], None]
    ) -> None:
        """Take the key's limits; `done` gets the ticket or the 429 (fleet.control.keys)."""
        assert self.store is not None
        self.store.admit_soon(record, reserve_tokens, done)

    def settle_soon(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int) -> None:
        """Charge what the request used and free its hold (not waited for)."""
        assert self.store is not None
        self.store.settle_soon(ticket, prompt_tokens, completion_tokens)
