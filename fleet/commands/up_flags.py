"""How `fleet up`'s flags become a spec: each flag overrides one spec field, and an invalid value is
reported naming the flag (or `--set`, or the spec file) that set it, before anything starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from fleet.commands.output import fail
from fleet.commands.preflight import (
    FlagError,
    check_hosts,
    check_model,
    check_port,
    check_redis_reachable,
)
from fleet.control.redis_conn import mask_redis_url
from fleet.spec import FleetSpec, SpecError, load_spec, parse_assignment

# The spec field each `fleet up` flag sets (model flags set it in every model).
SPEC_PATHS = {
    "name": "name",
    "backend": "backend",
    "ray_address": "ray_address",
    "hosts": "hosts.addresses",
    "ssh_user": "hosts.ssh_user",
    "ssh_key": "hosts.ssh_key",
    "redis_url": "redis.url",
    "host": "router.host",
    "port": "router.port",
    "policy": "router.policy",
    "keys": "keys.enabled",
    "admin_key": "keys.admin_key",
    "model": "models.*.path",
    "served_model_name": "models.*.served_model_name",
    "replicas": "models.*.replicas",
    "device": "models.*.device",
    "dtype": "models.*.dtype",
    "max_model_len": "models.*.max_model_len",
    "max_num_seqs": "models.*.max_num_seqs",
    "kv_cache_tokens": "models.*.kv_cache_tokens",
    "max_num_batched_tokens": "models.*.max_num_batched_tokens",
    "block_size": "models.*.block_size",
    "cpu_replicas": "models.*.cpu_replicas",
    "replica_arg": "models.*.args",
    "router_arg": "router.args",
    "max_restarts": "supervision.max_restarts",
    "ready_timeout": "supervision.ready_timeout_s",
    "drain_timeout": "supervision.drain_timeout_s",
}


def given_flags(flags: dict[str, Any]) -> dict[str, Any]:
    return {flag: value for flag, value in flags.items() if value is not None and value != []}


def _overrides(**flags: Any) -> dict[str, Any]:
    """Flag values that were given, as dotted spec paths (model flags apply to every model)."""
    out: dict[str, Any] = {}
    for flag, value in given_flags(flags).items():
        if flag == "replicas":
            value = value if value == "auto" else _int(value, "--replicas")
        elif flag == "hosts":
            value = _host_list(value)
        out[SPEC_PATHS[flag]] = value
    return out


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{flag}: expected a number or 'auto', got {text!r}") from None


def _host_list(text: str) -> list[str]:
    """`a,b,c` as a list (the spec checks each name, so a bad one is reported like any field)."""
    return [host.strip() for host in text.split(",")]


def build_spec(
    spec_file: Path | None, run_dir_opt: Path | None, sets: list[str], **flags: Any
) -> FleetSpec:
    overrides = _overrides(**flags)
    if run_dir_opt is not None:
        overrides["run_dir"] = str(run_dir_opt)
    try:
        for assignment in sets:
            key, value = parse_assignment(assignment)
            overrides[key] = value
        return load_spec(spec_file, overrides)
    except SpecError as exc:
        fail(_one_line(str(exc), spec_file, sets, given_flags(flags)), 2)


def _one_line(message: str, spec_file: Path | None, sets: list[str], flags: dict[str, Any]) -> str:
    """fleet.spec's "invalid fleet spec" and its field lines, as one line naming what set each
    field: `--max-num-seqs 0: models.0.max_num_seqs: ...`, `--set KEY`, or the spec file."""
    head, *fields = message.splitlines()
    if not fields:
        return message
    where = f"{spec_file}: " if spec_file is not None else ""
    described = []
    for line in fields:
        loc, _, why = line.strip().removeprefix(where).partition(": ")
        origin = _origin(loc, sets, flags) or where.rstrip(": ")
        if not origin:
            described.append(f"{loc}: {why}")
        else:
            described.append(
                f"{origin}: {why}" if origin.endswith(loc) else f"{origin}: {loc}: {why}"
            )
    return f"{head}: " + "; ".join(described)


def _origin(loc: str, sets: list[str], flags: dict[str, Any]) -> str | None:
    """The flag that set a spec field, as the user typed it; None: the spec file (or a default)."""
    for assignment in reversed(sets):  # the last --set of a field wins, as in build_spec
        key = assignment.partition("=")[0].strip()
        if loc == key or loc.startswith(key + "."):
            return f"--set {key}"
    for flag, value in flags.items():
        pattern = re.escape(SPEC_PATHS[flag]).replace(r"\*", r"\d+")
        if re.fullmatch(pattern + r"(\.\d+)?", loc):
            return f"--{flag.replace('_', '-')} {_shown(flag, value)}".rstrip()
    return None


def _shown(flag: str, value: Any) -> str:
    """A flag's value as an error message may show it: no secret, no Redis password."""
    if flag == "admin_key" or isinstance(value, bool):
        return ""
    return mask_redis_url(value) if flag == "redis_url" else str(value)


def preflight(spec: FleetSpec, flags: dict[str, Any]) -> None:
    """Values that cannot work end here, one line naming the flag (or spec field) and exit
    status 2, before any process starts: not after a replica crashed its way through restarts."""

    def name(flag: str, field: str) -> str:
        return f"--{flag.replace('_', '-')}" if flag in flags else field

    try:
        check_port(spec.router.host, spec.router.port, name("port", "router.port"))
        if spec.redis.url:
            check_redis_reachable(spec.redis.url, name("redis_url", "redis.url"))
        if spec.backend == "local":  # on Ray, the model folders are the replica hosts' to check
            for index, model in enumerate(spec.models):
                if model.path is not None:
                    check_model(model.path, name("model", f"models.{index}.path"))
        if spec.hosts.addresses:
            check_hosts(
                spec.hosts, name("hosts", "hosts.addresses"), name("ssh_key", "hosts.ssh_key")
            )
    except FlagError as exc:
        fail(str(exc), 2)
