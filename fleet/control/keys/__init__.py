"""API keys: authentication, per-key limits shared by every router, usage accounting.

Hot path (router or replica server)::

    store = KeyStore(redis_url); await store.start()
    record = await store.authenticate(bearer_token(request.headers.get("authorization")), model)
    async with store.admitted(record, reserve_tokens=prompt_tokens + max_tokens) as ticket:
        ...                                       # run the request
        await store.settle(ticket, prompt_tokens, completion_tokens)  # real usage; frees the slot

One job per module: records (plain data), credentials (secrets, admin key), layout (Redis key
names), scripts (the Lua in scripts/*.lua), limits (admission and settlement), batch (one tick's
admissions and settlements as one EVALSHA), local (limits
during a Redis outage), refusals (the errors, counted), admin (create, revoke, rotate, usage),
store (the cached view that ties them together), duration (`--expires-in` values).
"""

from fleet.control.keys.admin import KeyAdmin, KeyNotFound
from fleet.control.keys.credentials import (
    ADMIN_KEY_ENV,
    SECRET_PREFIX,
    admin_key_from_env,
    bearer_token,
    hash_secret,
    is_admin_key,
    new_admin_key,
    new_key_id,
    new_secret,
    require_admin,
)
from fleet.control.keys.duration import parse_duration
from fleet.control.keys.layout import WINDOW_S
from fleet.control.keys.limits import MAX_IN_DOUBT
from fleet.control.keys.local import LOCAL_ADMISSIONS
from fleet.control.keys.records import KeyRecord, KeyUsage, Ticket
from fleet.control.keys.refusals import KEY_REJECTIONS
from fleet.control.keys.store import KeyStore

__all__ = [
    "ADMIN_KEY_ENV",
    "KEY_REJECTIONS",
    "LOCAL_ADMISSIONS",
    "MAX_IN_DOUBT",
    "SECRET_PREFIX",
    "WINDOW_S",
    "KeyAdmin",
    "KeyNotFound",
    "KeyRecord",
    "KeyStore",
    "KeyUsage",
    "Ticket",
    "admin_key_from_env",
    "bearer_token",
    "hash_secret",
    "is_admin_key",
    "new_admin_key",
    "new_key_id",
    "new_secret",
    "parse_duration",
    "require_admin",
]
