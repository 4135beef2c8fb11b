"""Who may use this replica: a static `--api-key`, the fleet routers' key for this replica (only
its own id's, see fleet.control.internal), and with `--redis-url` the fleet's API keys.

Direct access to a replica is as protected as the router: fleet keys are authenticated, checked
against their allowed models and admitted under their rpm / tpm / concurrency limits by the same
`KeyStore` the router uses, and their usage is settled when the request ends (released on error or
disconnect). The static and internal keys, when they match, are unlimited. Probe routes never call
this module.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.requests import Request

from fleet.control.errors import APIError
from fleet.control.keys import KeyRecord, KeyStore, Ticket, bearer_token


@dataclass
class Admission:
    """One admitted request's hold on its key's limits; settle with the real usage or release."""

    store: KeyStore | None = None
    ticket: Ticket | None = None

    async def settle(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self.store is not None and self.ticket is not None:
            await self.store.settle(self.ticket, prompt_tokens, completion_tokens)

    async def release(self) -> None:
        if self.store is not None and self.ticket is not None:
            await self.store.release(self.ticket)


class Auth:
    def __init__(
        self, api_key: str | None, keystore: KeyStore | None, *, internal_key: str | None = None
    ) -> None:
        self.api_key = api_key
        self.keystore = keystore
        self.internal_key = internal_key

    @property
    def enabled(self) -> bool:
        return self.api_key is not None or self.keystore is not None or bool(self.internal_key)

    async def authenticate(self, request: Request) -> KeyRecord | None:
        """The fleet key's record; None for the static key or when auth is off. Raises 401/503."""
        if not self.enabled:
            return None
        secret = bearer_token(request.headers.get("authorization"))
        if secret is not None and any(
            key and _same(secret, key) for key in (self.api_key, self.internal_key)
        ):
            return None
        if self.keystore is not None:
            return await self.keystore.authenticate(secret)
        if secret is None:
            raise APIError(
                401,
                "Missing API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_operator(self, request: Request) -> None:
        """For routes that show the replica's internals (load, metrics, API schema): only the
        static key or the routers' key, never a user's fleet key. 401 otherwise."""
        if self.api_key is None and not self.internal_key:
            return
        secret = bearer_token(request.headers.get("authorization"))
        if secret is None or not any(
            key and _same(secret, key) for key in (self.api_key, self.internal_key)
        ):
            raise APIError(
                401, "This route needs the replica's operator key.", code="invalid_api_key"
            )

    async def admit(self, record: KeyRecord | None, model: str, reserve_tokens: int) -> Admission:
        """Check the key may use `model` (403) and take its limits (429 with Retry-After)."""
        if record is None or self.keystore is None:
            return Admission()
        record.check_model(model)
        ticket = await self.keystore.admit(record, reserve_tokens)
        return Admission(self.keystore, ticket)


def _same(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())
