"""Checks `fleet up`, `fleet router` and `fleet replica` run on their flags before starting anything.

A flag value that cannot work (a model folder that is not there, a port someone else listens on,
a Redis URL that is no URL) is one line naming the flag and exit status 2, like any usage error,
instead of a server that starts, crashes, is restarted and ends in a traceback.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from fleet.control.redis_conn import REDIS_DOWN_ERRORS, mask_redis_url, sync_client
from fleet.spec import HostsSpec

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class FlagError(ValueError):
    """A flag whose value cannot work; the message starts with the flag and its value."""


@contextlib.contextmanager
def usage_errors(prog: str) -> Iterator[None]:
    """A FlagError (or the ValueError of a setting built from flags) inside is one line on stderr
    and exit status 2, as argparse and click report usage errors."""
    try:
        yield
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def check_model(model: str, flag: str = "--model") -> None:
    """A local model folder with a readable config.json, or a Hub id (cached, when offline)."""
    path = Path(model).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FlagError(f"{flag} {model}: no config.json in that folder (not a model folder)")
        if not os.access(config, os.R_OK):
            raise FlagError(f"{flag} {model}: cannot read {config}")
        return
    if path.exists():
        raise FlagError(f"{flag} {model}: not a folder (a model is a folder with config.json)")
    if not _is_hub_id(model):
        raise FlagError(f"{flag} {model}: no such folder")
    if _hub_offline() and not _in_hub_cache(model):
        raise FlagError(
            f"{flag} {model}: no such folder, and not in the Hugging Face cache "
            "(HF_HUB_OFFLINE is set, so it cannot be downloaded)"
        )


def _is_hub_id(model: str) -> bool:
    """`org/name` or `name`, as the Hub spells ids (a path like /x or ./x never is one)."""
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id
    except ImportError:  # the Hub client is optional for a fleet of local folders
        return True
    try:
        validate_repo_id(model)
    except ValueError:
        return False
    return True


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hub_cache(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def check_port(host: str, port: int, flag: str = "--port") -> None:
    """Bind the address as the server will (SO_REUSEADDR, as uvicorn does) and let it go again."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise FlagError(f"--host {host}: {exc.strerror}") from None
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise FlagError(
                f"{flag} {port}: cannot listen on {host} port {port}: {reason} "
                f"(in use? pick another {flag})"
            ) from None


def check_redis_url(url: str | None, flag: str = "--redis-url") -> None:
    """A URL redis-py can parse: a bare `host:port` would fail only later, in every request."""
    if url is None:
        return
    if not url.startswith(REDIS_SCHEMES):
        raise FlagError(
            f"{flag} {mask_redis_url(url)}: expected a redis://, rediss:// or unix:// URL"
        )
    from redis.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        raise FlagError(f"{flag} {mask_redis_url(url)}: {exc}") from None


def check_redis_reachable(url: str, flag: str = "--redis-url") -> None:
    """One PING: a fleet started on a Redis it cannot reach would only log outages."""
    check_redis_url(url, flag)
    try:
        with sync_client(url) as client:
            client.ping()
    except REDIS_DOWN_ERRORS as exc:
        raise FlagError(f"{flag} {mask_redis_url(url)}: cannot reach Redis: {exc}") from None


def check_hosts(hosts: HostsSpec, hosts_flag: str = "--hosts", key_flag: str = "--ssh-key") -> None:
    """A readable SSH key, and every host letting us in with it: checked here, a host that refuses
    is one line naming it, not a page of `ray up` output after the fleet began to start."""
    from fleet.launch.ray_cluster import DEFAULT_KEYS, ssh_key, ssh_login

    key = ssh_key(hosts.ssh_key)
    if key is None:
        raise FlagError(
            f"{key_flag}: not given, and there is no ~/.ssh/{' or ~/.ssh/'.join(DEFAULT_KEYS)}"
        )
    if not key.is_file():
        raise FlagError(f"{key_flag} {key}: no such file")
    if not os.access(key, os.R_OK):
        raise FlagError(f"{key_flag} {key}: cannot read it")
    login = ssh_login(hosts)
    refused = login.refusals(hosts.addresses)
    if refused:
        host, reason = next(iter(refused.items()))
        more = f" (and {len(refused) - 1} more host(s))" if len(refused) > 1 else ""
        raise FlagError(
            f"{hosts_flag} {','.join(hosts.addresses)}: cannot log in to {host} over SSH as "
            f"{login.user} with {key_flag} {key}: {reason}{more}"
        )
