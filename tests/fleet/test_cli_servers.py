"""`fleet router` and `fleet replica` are typer commands like every other `fleet` command (rich
help, click's usage errors), and keep every flag name and default they had under argparse
(deploy files, `fleet up` and users' scripts pass them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MiB = 1024 * 1024
ROUTER_DEFAULTS = {
    "host": "127.0.0.1", "port": 8000, "redis_url": None, "redis_prefix": "fleet",
    "policy": "prefix", "replica": [], "admin_key": None, "api_key": [], "fleet_keys": True,
    "upstream_api_key": None, "metrics_key": None, "max_body_bytes": 8 * MiB,
    "max_answer_bytes": 64 * MiB, "connect_timeout": 3.0, "ttfb_timeout": 300.0,
    "idle_timeout": 60.0, "max_attempts": 3, "retry_budget": 0.2, "prefix_queue_weight": 64.0,
    "kv_events": True, "tokenizer": [],
    "probe_interval": 1.0, "load_interval": 1.0, "log_level": "info", "max_connections": 10_000,
    "upstream_ca_certs": None, "queue_size": 1024, "queue_timeout": 30.0, "queue_per_key": 0,
    "replica_max_in_flight": 0, "otlp_endpoint": None, "workers": 1,
}  # fmt: skip
REPLICA_DEFAULTS = {
    "model": "m", "served_model_name": None, "host": "127.0.0.1", "port": 8001, "device": "auto",
    "dtype": "auto", "max_model_len": None, "max_num_seqs": 256, "max_num_batched_tokens": None,
    "block_size": 16, "kv_cache_tokens": None, "kv_cache_memory": None,
    "gpu_memory_utilization": 0.9, "enable_prefix_caching": True, "kernel_backend": "auto",
    "seed": 0, "task": "generate", "pooling": "last", "api_key": None, "redis_url": None,
    "redis_prefix": "fleet", "fleet_keys": True,
    "advertise_url": None, "kv_events": True, "replica_id": None, "max_waiting": 1024, "max_seqs_per_request": 256,
    "chat_template": None, "tool_call_parser": "auto", "prompt_timeout": 5.0, "drain_grace": 30.0,
    "max_body_bytes": 8 * MiB, "protect_info_routes": False, "log_level": "info",
    "otlp_endpoint": None,
}  # fmt: skip
WEB_DEFAULTS = {
    "ssl_keyfile": None, "ssl_certfile": None, "ssl_ca_certs": None, "ssl_cert_reqs": None,
    "allowed_origins": None, "allowed_methods": ["*"], "allowed_headers": ["*"],
    "allow_credentials": False,
}  # fmt: skip
ENV_VARS = ("FLEET_REDIS_URL", "FLEET_REDIS_PREFIX", "FLEET_ADMIN_KEY", "FLEET_REPLICA_API_KEY",
            "FLEET_UPSTREAM_API_KEY", "FLEET_METRICS_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT")  # fmt: skip


def flag(dest: str) -> str:
    return "--no-fleet-keys" if dest == "fleet_keys" else "--" + dest.replace("_", "-")


@pytest.fixture(autouse=True)
def no_fleet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_router_keeps_every_flag_and_default() -> None:
    from router.__main__ import parse_args

    assert vars(parse_args([])) == {**ROUTER_DEFAULTS, **WEB_DEFAULTS}
    args = parse_args(["--replica", "a=http://h:1", "--replica", "http://h:2", "--api-key", "k1",
                       "--api-key", "k2", "--no-fleet-keys", "--policy", "least-load",
                       "--allowed-origins", '["https://a.example"]', "--allow-credentials",
                       "--ssl-cert-reqs", "1", "--log-level", "debug"])  # fmt: skip
    assert args.replica == ["a=http://h:1", "http://h:2"] and args.api_key == ["k1", "k2"]
    assert (args.fleet_keys, args.policy, args.log_level) == (False, "least-load", "debug")
    assert args.allowed_origins == ["https://a.example"] and args.allow_credentials
    assert args.ssl_cert_reqs == 1


def test_replica_keeps_every_flag_and_default() -> None:
    from replica.__main__ import parse_args

    assert vars(parse_args(["--model", "m"])) == {**REPLICA_DEFAULTS, **WEB_DEFAULTS}
    args = parse_args(["--model", "m", "--no-enable-prefix-caching", "--no-fleet-keys",
                       "--protect-info-routes", "--allowed-methods", "GET,POST"])  # fmt: skip
    assert not args.enable_prefix_caching and not args.fleet_keys and args.protect_info_routes
    assert args.allowed_methods == ["GET", "POST"]
    several = parse_args(["--model", "m", "--served-model-name", "a", "b", "--port", "1"])
    assert several.served_model_name == ["a", "b"] and several.port == 1  # vLLM's spelling
    assert parse_args(["--model", "m", "--served-model-name", "a"]).served_model_name == ["a"]


def test_flags_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from replica.__main__ import parse_args as replica_args
    from router.__main__ import parse_args as router_args

    monkeypatch.setenv("FLEET_REDIS_URL", "redis://h:1/0")
    monkeypatch.setenv("FLEET_REDIS_PREFIX", "other")
    monkeypatch.setenv("FLEET_ADMIN_KEY", "sk-admin")
    monkeypatch.setenv("FLEET_REPLICA_API_KEY", "sk-replica")
    router = router_args([])
    assert (router.redis_url, router.redis_prefix, router.admin_key) == (
        "redis://h:1/0",
        "other",
        "sk-admin",
    )
    replica = replica_args(["--model", "m"])
    assert (replica.redis_url, replica.api_key) == ("redis://h:1/0", "sk-replica")


def run(*argv: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    ("argv", "prog", "defaults"),
    [
        (["-m", "fleet", "router", "--help"], "fleet router", ROUTER_DEFAULTS),
        (["-m", "router", "--help"], "fleet router", ROUTER_DEFAULTS),
        (["-m", "fleet", "replica", "--help"], "fleet replica", REPLICA_DEFAULTS),
        (["-m", "replica", "--help"], "fleet replica", REPLICA_DEFAULTS),
    ],
)
def test_server_help_is_rich_like_every_other_command(
    argv: list[str], prog: str, defaults: dict
) -> None:
    result = run(*argv)
    assert result.returncode == 0, result.stderr
    help_text = result.stdout
    assert f"Usage: {prog} [OPTIONS]" in help_text
    assert "╭─ Options" in help_text or "╭─" in help_text  # rich panels, as `fleet up --help`
    for dest in [*defaults, *WEB_DEFAULTS]:
        assert flag(dest) in help_text, flag(dest)
    fleet_keys_line = next(line for line in help_text.splitlines() if "--no-fleet-keys" in line)
    assert "default: True" not in fleet_keys_line


def test_importing_the_entry_points_loads_no_server() -> None:
    code = (
        "import sys, replica.__main__, router.__main__; from replica import LLM; "
        "print(sorted(m for m in ('uvicorn', 'replica.http_api.app', 'router.serve', 'router.app') "
        "if m in sys.modules))"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
