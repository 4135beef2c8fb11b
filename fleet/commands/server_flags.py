"""What `fleet router` and `fleet replica` share: their Redis, TLS and CORS flags as typer options,
and how each runs as a typer command of its own (`python -m router`, `python -m replica`).

Each server's command returns `ctx.obj(flags)`: `run` passes the server's main function, `parse`
one that returns the flags, so tests and deploy-file checks read exactly what the server would.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Callable
from typing import Any, Literal

import typer

from fleet.control.redis_conn import DEFAULT_PREFIX, PREFIX_ENV, REDIS_URL_ENV
from fleet.telemetry import OTLP_ENDPOINT_ENV
from fleet.web_security import string_list

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
FLEET, TLS, CORS = "Fleet", "TLS", "CORS"


def server_app(help_text: str) -> typer.Typer:
    return typer.Typer(
        help=help_text,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def run(app: typer.Typer, prog: str, argv: list[str] | None, main: Callable[..., int]) -> None:
    """Parse like every `fleet` command (rich help, usage errors exit 2), then exit with main's
    status."""
    typer.main.get_command(app).main(args=argv, prog_name=prog, obj=lambda a: sys.exit(main(a)))


def parse(app: typer.Typer, prog: str, argv: list[str] | None) -> argparse.Namespace:
    """The flags as the server would get them, without running it."""
    command = typer.main.get_command(app)
    return command.main(args=argv, prog_name=prog, standalone_mode=False, obj=lambda a: a)


def hand_over(ctx: typer.Context, values: dict[str, Any]) -> Any:
    """A command's flags (its `locals()`), as a namespace, to what `run` or `parse` asked for."""
    return ctx.obj(argparse.Namespace(**{k: v for k, v in values.items() if k != "ctx"}))


def _string_list(text: str) -> list[str]:
    try:
        return string_list(text)
    except (argparse.ArgumentTypeError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"{text!r}: {exc}") from None


# The options both servers take, declared once (typer reads them from each command's signature).
REDIS_URL = typer.Option(
    None, "--redis-url", envvar=REDIS_URL_ENV, rich_help_panel=FLEET,
    help="Redis of the fleet's control plane (redis://, rediss:// or unix://).",
)  # fmt: skip
REDIS_PREFIX = typer.Option(
    DEFAULT_PREFIX, "--redis-prefix", envvar=PREFIX_ENV, rich_help_panel=FLEET,
    help="Prefix of the fleet's Redis keys.",
)  # fmt: skip
SSL_KEYFILE = typer.Option(
    None, "--ssl-keyfile", rich_help_panel=TLS, help="Private key of --ssl-certfile (PEM)."
)
SSL_CERTFILE = typer.Option(
    None, "--ssl-certfile", rich_help_panel=TLS, help="Serve HTTPS with this certificate chain."
)
SSL_CA_CERTS = typer.Option(
    None, "--ssl-ca-certs", rich_help_panel=TLS,
    help="CA bundle client certificates must chain to (mutual TLS).",
)  # fmt: skip
SSL_CERT_REQS = typer.Option(
    None, "--ssl-cert-reqs", min=int(ssl.CERT_NONE), max=int(ssl.CERT_REQUIRED),
    rich_help_panel=TLS,
    help="Client certificates: 0 none, 1 optional, 2 required (default: 2 with --ssl-ca-certs).",
)  # fmt: skip
ALLOWED_ORIGINS = typer.Option(
    None, "--allowed-origins", parser=_string_list, metavar="LIST", rich_help_panel=CORS,
    help='Origins browsers may call from (JSON list or comma-separated; "*" any); '
    "CORS is off without it.",
)  # fmt: skip
ALLOWED_METHODS = typer.Option(
    "*", "--allowed-methods", parser=_string_list, metavar="LIST", rich_help_panel=CORS,
    help="Allowed methods.",
)  # fmt: skip
ALLOWED_HEADERS = typer.Option(
    "*", "--allowed-headers", parser=_string_list, metavar="LIST", rich_help_panel=CORS,
    help="Allowed request headers.",
)  # fmt: skip
ALLOW_CREDENTIALS = typer.Option(
    False, "--allow-credentials", rich_help_panel=CORS, help="Allow cookies and credentials."
)
LOG_LEVEL = typer.Option("info", "--log-level", case_sensitive=False, help="Logging level.")
OTLP_ENDPOINT = typer.Option(
    None, "--otlp-endpoint", envvar=OTLP_ENDPOINT_ENV, metavar="URL",
    help="Export OpenTelemetry spans over OTLP/HTTP to this collector (http://host:4318); "
    "needs the otel extra. Off without it.",
)  # fmt: skip
