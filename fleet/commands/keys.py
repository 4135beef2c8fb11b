"""`fleet keys ...`: create, list, revoke, rotate API keys and read their usage.

Secrets are printed once, at create and rotate; Redis keeps only their SHA-256 digests.
Every command takes `--redis-url` (env FLEET_REDIS_URL; without either, the Redis of the fleet
`fleet up` runs from the run folder, whose password is in its private state file) and `--json`.
"""

from __future__ import annotations

import asyncio
import datetime
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
import redis.asyncio as aioredis
import typer
from rich.console import Console
from rich.table import Table

from fleet.control.errors import APIError
from fleet.control.keys import KeyAdmin, KeyRecord, KeyUsage, parse_duration
from fleet.control.redis_conn import (
    PREFIX_ENV,
    REDIS_DOWN_ERRORS,
    REDIS_URL_ENV,
    async_client,
    mask_redis_url,
    resolve_prefix,
    resolve_redis_url,
)
from fleet.launch.state import FleetState
from fleet.spec import run_dir

T = TypeVar("T")

REDIS_URL = typer.Option(None, "--redis-url", envvar=REDIS_URL_ENV, help="Redis of the fleet.")
PREFIX = typer.Option(None, "--prefix", envvar=PREFIX_ENV, help="Prefix of the fleet's keys.")
JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")

# Piped output (grep, awk, a log) gets whole names and ids: rich would squeeze the table into 80
# columns and cut them ("hel…"). The terminal keeps its own width.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 10_000)


def fleet_redis_url(redis_url: str | None) -> str | None:
    """The given URL, else that of the fleet running from the run folder, else None (default)."""
    if redis_url:
        return redis_url
    state = FleetState.load(run_dir())
    return state.redis_url if state is not None and state.manager_alive() else None


def run_redis(redis_url: str | None, action: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run one async Redis action; unreachable Redis and API errors become a clean exit 1."""
    redis_url = fleet_redis_url(redis_url)

    async def go() -> T:
        client = async_client(redis_url, socket_timeout=3.0, connect_timeout=3.0)
        try:
            return await action(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except APIError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except REDIS_DOWN_ERRORS as exc:
        where = mask_redis_url(resolve_redis_url(redis_url))
        flag = f"--redis-url, env {REDIS_URL_ENV}"
        typer.echo(f"error: cannot reach Redis at {where} ({flag}): {exc}", err=True)
        raise typer.Exit(1) from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def echo_json(data: object) -> None:
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _records_table(records: list[KeyRecord]) -> Table:
    table = Table(title="API keys")
    table.add_column("id", no_wrap=True)
    for column in ("name", "status", "models", "rpm", "tpm", "max conc.", "created", "expires"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.id,
            r.name,
            r.status(),
            ",".join(r.models) or "*",
            _limit(r.rpm),
            _limit(r.tpm),
            _limit(r.max_concurrent),
            _when(r.created_at),
            _when(r.expires_at),
        )
    return table


def _show_secret(record: KeyRecord, secret: str, as_json: bool, verb: str) -> None:
    if as_json:
        echo_json({**record.public(), "secret": secret})
        return
    console.print(f"{verb} API key [bold]{record.id}[/bold] ({record.name})")
    console.print("Secret, shown only this once; store it now:")
    typer.echo(secret)


def _usage_table(usage: KeyUsage, record: KeyRecord) -> Table:
    table = Table(title=f"Usage of {record.id} ({record.name})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("requests", usage.requests),
        ("prompt tokens", usage.prompt_tokens),
        ("completion tokens", usage.completion_tokens),
        ("total tokens", usage.total_tokens),
        ("requests, last 60 s", f"{usage.window_requests} / {_limit(record.rpm)}"),
        ("tokens, last 60 s", f"{usage.window_tokens} / {_limit(record.tpm)}"),
        ("in flight", f"{usage.concurrent} / {_limit(record.max_concurrent)}"),
        ("last used", _when(usage.last_used_at)),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def register(app: typer.Typer) -> None:
    keys_app = typer.Typer(help="Manage API keys and their limits.", no_args_is_help=True)
    app.add_typer(keys_app, name="keys")

    @keys_app.command("create")
    def create(
        name: str = typer.Option(..., "--name", help="Who or what the key is for."),
        models: str = typer.Option("", "--models", help="Comma-separated models (default: all)."),
        rpm: int = typer.Option(None, "--rpm", min=1, help="Requests per minute."),
        tpm: int = typer.Option(None, "--tpm", min=1, help="Tokens per minute."),
        max_concurrent: int = typer.Option(
            None, "--max-concurrent", min=1, help="Requests in flight at once."
        ),
        expires: str = typer.Option(None, "--expires", help="Lifetime, e.g. 30d, 12h, 90m."),
        redis_url: str = REDIS_URL,
        prefix: str = PREFIX,
        as_json: bool = JSON,
    ) -> None:
        """Create a key and print its secret (once)."""
        try:
            expires_in = parse_duration(expires) if expires else None
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--expires") from exc
        model_list = [m.strip() for m in models.split(",") if m.strip()]
        record, secret = run_redis(
            redis_url,
            lambda c: KeyAdmin(c, resolve_prefix(prefix)).create(
                name,
                models=model_list,
                rpm=rpm,
                tpm=tpm,
                max_concurrent=max_concurrent,
                expires_in=expires_in,
            ),
        )
        _show_secret(record, secret, as_json, "Created")

    @keys_app.command("list")
    def list_keys(redis_url: str = REDIS_URL, prefix: str = PREFIX, as_json: bool = JSON) -> None:
        """List keys and their limits (never their secrets)."""
        records = run_redis(redis_url, lambda c: KeyAdmin(c, resolve_prefix(prefix)).list())
        if as_json:
            echo_json([r.public() for r in records])
        else:
            console.print(_records_table(records))

    @keys_app.command("revoke")
    def revoke(
        key_id: str = typer.Argument(..., help="Key id (key_...)."),
        redis_url: str = REDIS_URL,
        prefix: str = PREFIX,
        as_json: bool = JSON,
    ) -> None:
        """Disable a key for good; every router refuses it within a second."""
        record = run_redis(redis_url, lambda c: KeyAdmin(c, resolve_prefix(prefix)).revoke(key_id))
        if as_json:
            echo_json(record.public())
        else:
            console.print(f"Revoked API key [bold]{record.id}[/bold] ({record.name})")

    @keys_app.command("rotate")
    def rotate(
        key_id: str = typer.Argument(..., help="Key id (key_...)."),
        redis_url: str = REDIS_URL,
        prefix: str = PREFIX,
        as_json: bool = JSON,
    ) -> None:
        """Give a key a new secret (same id and limits); the old secret stops working."""
        record, secret = run_redis(
            redis_url, lambda c: KeyAdmin(c, resolve_prefix(prefix)).rotate(key_id)
        )
        _show_secret(record, secret, as_json, "Rotated")

    @keys_app.command("usage")
    def usage(
        key_id: str = typer.Argument(..., help="Key id (key_...)."),
        redis_url: str = REDIS_URL,
        prefix: str = PREFIX,
        as_json: bool = JSON,
    ) -> None:
        """Requests and tokens used by a key, in total and in the current minute."""

        async def read(client: aioredis.Redis) -> tuple[KeyRecord, KeyUsage]:
            admin = KeyAdmin(client, resolve_prefix(prefix))
            return await admin.get(key_id), await admin.usage(key_id)

        record, used = run_redis(redis_url, read)
        if as_json:
            echo_json({**used.__dict__, "total_tokens": used.total_tokens})
        else:
            console.print(_usage_table(used, record))
