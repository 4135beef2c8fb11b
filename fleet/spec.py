"""The fleet spec: what `fleet up` starts, as YAML with every field also settable from the command line.

An empty spec is a working fleet: the factory's tiny model with `replicas: auto` (one replica per
visible GPU, or `cpu_replicas` CPU replicas on a machine without one), an embedded Redis, API keys
on, and the router on 127.0.0.1:8000. Example:

    name: demo
    backend: local            # or ray (then ray_address, or hosts to bring up over SSH)
    redis: {url: null}        # null: an embedded redis-server for this fleet
    router: {host: 0.0.0.0, port: 8000, policy: prefix}
    keys: {enabled: true, admin_key: null}   # null: FLEET_ADMIN_KEY, else generated
    models:
      - path: /models/Llama-3.1-8B-Instruct
        served_model_name: llama-8b
        replicas: auto
        dtype: bfloat16
        kv_cache_tokens: 200000
        args: ["--max-num-seqs", "128"]     # anything else `python -m replica` accepts

Command-line flags are applied on top as dotted overrides (`models.*.dtype=bfloat16`,
`router.port=9000`), so a flag and a YAML field are one mechanism, checked by the same validation.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ADMIN_KEY_ENV = "FLEET_ADMIN_KEY"
FLEET_HOME_ENV = "FLEET_HOME"

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class SpecError(ValueError):
    """A spec that cannot be used, with a message that names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    """One model served by `replicas` identical replica servers."""

    path: str | None = Field(
        None, description="Model folder or Hugging Face id; null: the factory's tiny model."
    )
    served_model_name: str | None = Field(
        None, description="Name clients send as `model` (default: the folder's name)."
    )
    replicas: int | Literal["auto"] = Field(
        "auto", description="Replica count, or auto: one per GPU (cpu_replicas without GPUs)."
    )
    cpu_replicas: int = Field(2, ge=1, description="What `auto` means on a machine with no GPU.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(None, gt=0)
    max_num_seqs: int | None = Field(None, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)
    kv_cache_tokens: int | None = Field(None, gt=0)
    block_size: int | None = Field(None, gt=0)
    args: list[str] = Field(default_factory=list, description="Extra `python -m replica` flags.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")

    @field_validator("replicas")
    @classmethod
    def _replicas_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("replicas must be 0 or more, or 'auto'")
        return value

    def display_name(self, default_path: Path | None = None) -> str:
        """The name clients use; for the factory default, the cached folder's name."""
        if self.served_model_name:
            return self.served_model_name
        if self.path:
            return Path(self.path.rstrip("/")).name or self.path
        return default_path.name if default_path else "tiny"

    def engine_flags(self) -> list[str]:
        """The replica server flags this model's fields stand for (path and name excluded)."""
        flags: list[str] = []
        for field_name in (
            "dtype",
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "kv_cache_tokens",
            "block_size",
        ):
            value = getattr(self, field_name)
            if value is not None and value != "auto":
                flags += ["--" + field_name.replace("_", "-"), str(value)]
        return [*flags, *self.args]


class RouterSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    policy: Literal["prefix", "least-load", "round-robin"] = "prefix"
    args: list[str] = Field(default_factory=list, description="Extra `python -m router` flags.")


class RedisSpec(_Strict):
    url: str | None = Field(None, description="Fleet Redis; null: start an embedded redis-server.")

    @field_validator("url")
    @classmethod
    def _is_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value


class KeysSpec(_Strict):
    enabled: bool = Field(True, description="Require API keys at the router and replicas.")
    admin_key: str | None = Field(None, description=f"null: ${ADMIN_KEY_ENV}, else generated.")
    example_key: bool = Field(True, description="Create a key for the printed example request.")


class SupervisionSpec(_Strict):
    max_restarts: int = Field(5, ge=0, description="Quick crashes in a row before giving up.")
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    stable_after_s: float = Field(60.0, gt=0, description="Uptime that forgives earlier crashes.")
    ready_timeout_s: float = Field(600.0, gt=0)
    drain_timeout_s: float = Field(60.0, gt=0, description="SIGTERM grace before SIGKILL.")


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOSTNAME.match(text))
    return True


class HostsSpec(_Strict):
    """On-prem hosts that `fleet up` makes a Ray cluster of over SSH, with Ray's cluster launcher
    (fleet.launch.ray_cluster); every host needs fleetserve installed at this machine's path."""

    addresses: list[str] = Field(
        default_factory=list, description="Host names or IPs; the first runs Ray's head. []: none."
    )
    ssh_user: str | None = Field(None, description="SSH user on every host; null: this user.")
    ssh_key: str | None = Field(
        None, description="SSH private key; null: ~/.ssh/id_ed25519, else ~/.ssh/id_rsa."
    )
    ray_port: int = Field(6380, ge=1, le=65535, description="The head's Ray (GCS) port.")
    client_port: int = Field(10001, ge=1, le=65535, description="The head's Ray Client port.")
    ray_args: list[str] = Field(
        default_factory=list, description="Extra `ray start` flags on every host: --num-gpus=2."
    )
    join_timeout_s: float = Field(300.0, gt=0, description="How long hosts may take to join.")

    @field_validator("addresses")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host:
                raise ValueError("an empty host name (a comma too many?)")
            if not _is_host(host):
                raise ValueError(f"{host!r} is not a host name or IP address")
        repeated = sorted({h for h in value if value.count(h) > 1})
        if repeated:
            raise ValueError(f"hosts must differ (repeated: {', '.join(repeated)})")
        return value

    @field_validator("ssh_user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._][A-Za-z0-9._-]*", value):
            raise ValueError(f"{value!r} is not a user name")
        return value


class FleetSpec(_Strict):
    name: str = Field("default", description="Names Ray actors and log files of this fleet.")
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(None, description="Ray cluster (ray backend); null: auto.")
    run_dir: str | None = Field(None, description=f"State and logs; null: ${FLEET_HOME_ENV}.")
    redis: RedisSpec = Field(default_factory=RedisSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    keys: KeysSpec = Field(default_factory=KeysSpec)
    supervision: SupervisionSpec = Field(default_factory=SupervisionSpec)
    hosts: HostsSpec = Field(default_factory=HostsSpec)
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec()])

    @model_validator(mode="before")
    @classmethod
    def _hosts_imply_ray(cls, data: Any) -> Any:
        """Hosts to bring up are a Ray cluster: `--hosts` alone means `--backend ray`."""
        if isinstance(data, dict) and "backend" not in data:
            hosts = data.get("hosts")
            if isinstance(hosts, dict) and hosts.get("addresses"):
                return {**data, "backend": "ray"}
        return data

    @field_validator("name")
    @classmethod
    def _dns_like(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use lowercase letters, digits and '-' (at most 40 characters)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FleetSpec:
        if not self.models:
            raise ValueError("models: at least one model is needed")
        names = [m.served_model_name or m.path or "" for m in self.models]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"models: served names must differ (repeated: {sorted(duplicates)})")
        if self.ray_address and self.backend != "ray":
            raise ValueError("ray_address is only meaningful with backend: ray")
        if self.hosts.addresses and self.backend != "ray":
            raise ValueError("hosts (--hosts) become a Ray cluster: backend must be ray")
        if self.hosts.addresses and self.ray_address:
            raise ValueError(
                "hosts (--hosts) start a Ray cluster of their own: drop ray_address (--ray-address)"
            )
        return self

    def resolved_run_dir(self) -> Path:
        return run_dir(self.run_dir)

    def find_model(self, name: str) -> int:
        """Index of the model served as `name` (or whose path is `name`)."""
        for index, model in enumerate(self.models):
            if name in (model.served_model_name, model.path, model.display_name()):
                return index
        raise SpecError(f"no model named {name!r} in this fleet")


def run_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where a fleet keeps its state file and logs: explicit, then $FLEET_HOME, then the cache."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(FLEET_HOME_ENV):
        return Path(os.environ[FLEET_HOME_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fleetserve" / "run"


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts/lists; `*` applies to every item of a list (e.g. `models.*.dtype`)."""
    parts = dotted.split(".")
    targets: list[Any] = [data]
    for part in parts[:-1]:
        next_targets: list[Any] = []
        for node in targets:
            if isinstance(node, list):
                next_targets += node if part == "*" else [node[_index(part, len(node), dotted)]]
            else:
                next_targets.append(node.setdefault(part, {}))
        targets = next_targets
    for node in targets:
        if isinstance(node, list):
            node[_index(parts[-1], len(node), dotted)] = value
        else:
            node[parts[-1]] = value


def _index(part: str, length: int, dotted: str) -> int:
    if not part.lstrip("-").isdigit() or not -length <= int(part) < length:
        raise SpecError(f"{dotted}: {part!r} is not an index of a list of {length}")
    return int(part)


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key.path=value` from `--set`; the value is read as YAML (so 3, true, null, [a, b] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE, e.g. router.port=9000")
    return key.strip(), yaml.safe_load(raw) if raw else ""


def load_spec(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> FleetSpec:
    """Read a YAML (or JSON) spec, apply dotted overrides, validate; errors name the field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise SpecError(f"cannot read spec {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise SpecError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise SpecError(
                f"{path}: the spec must be a mapping of fields, not {type(loaded).__name__}"
            )
        data = loaded or {}
    if "models" not in data and any(k.startswith("models.") for k in overrides or {}):
        data["models"] = [{}]
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    try:
        return FleetSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_describe(exc, path)) from None


def _describe(exc: ValidationError, path: str | os.PathLike | None) -> str:
    where = f"{path}: " if path else ""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "spec"
        lines.append(f"{where}{loc}: {err['msg']}")
    return "invalid fleet spec\n  " + "\n  ".join(lines)


def visible_gpus() -> list[str]:
    """GPU indices this host may use: $CUDA_VISIBLE_DEVICES, else what `nvidia-smi -L` lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def replica_count(model: ModelSpec, gpus: int) -> int:
    """`auto` is one replica per GPU, or the CPU count on a machine without GPUs."""
    if model.replicas != "auto":
        return model.replicas
    if model.device == "cpu" or gpus == 0:
        return model.cpu_replicas
    return gpus


def replica_device(model: ModelSpec, gpus: int) -> str:
    if model.device != "auto":
        return model.device
    return "cuda" if gpus else "cpu"


def dump_spec(spec: FleetSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
