"""`fleet keys ...`, `fleet register` and `fleet unregister` against a real Redis."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fleet.cli import app
from fleet.control.keys import hash_secret
from fleet.control.membership import list_replicas_sync
from fleet.control.redis_conn import sync_client


@pytest.fixture
def fleet(redis_url: str, prefix: str):
    runner = CliRunner()
    env = {"FLEET_REDIS_URL": redis_url, "FLEET_REDIS_PREFIX": prefix, "COLUMNS": "200"}

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == code, result.output
        return result.output

    return run


def test_keys_lifecycle(fleet, redis_url: str, prefix: str) -> None:
    created = json.loads(
        fleet(
            "keys",
            "create",
            "--name",
            "team-a",
            "--models",
            "llama,qwen",
            "--rpm",
            "60",
            "--tpm",
            "5000",
            "--max-concurrent",
            "4",
            "--expires",
            "30d",
            "--json",
        )
    )
    key_id, secret = created["id"], created["secret"]
    assert secret.startswith("sk-") and len(secret) >= 3 + 22  # >= 128 bits in base64url
    assert created["models"] == ["llama", "qwen"] and created["rpm"] == 60
    assert 29.9 * 86400 < created["expires_at"] - created["created_at"] <= 30 * 86400

    table = fleet("keys", "list")
    assert key_id in table and "team-a" in table and secret not in table
    listed = json.loads(fleet("keys", "list", "--json"))
    assert [k["id"] for k in listed] == [key_id]
    assert "secret" not in listed[0] and "secret_hash" not in listed[0]

    rotated = json.loads(fleet("keys", "rotate", key_id, "--json"))
    assert rotated["id"] == key_id and rotated["secret"] != secret and rotated["tpm"] == 5000
    with sync_client(redis_url) as client:
        assert client.get(f"{prefix}:keyhash:{hash_secret(rotated['secret'])}") == key_id.encode()
        assert client.get(f"{prefix}:keyhash:{hash_secret(secret)}") is None

    usage = json.loads(fleet("keys", "usage", key_id, "--json"))
    assert usage["requests"] == 0 and usage["total_tokens"] == 0
    assert "requests, last 60 s" in fleet("keys", "usage", key_id)

    assert "Revoked" in fleet("keys", "revoke", key_id)
    assert json.loads(fleet("keys", "list", "--json"))[0]["status"] == "revoked"
    assert "revoked" in fleet("keys", "rotate", key_id, code=1)


def test_keys_errors_are_clean(fleet) -> None:
    assert "No API key with id 'key_missing'" in fleet("keys", "revoke", "key_missing", code=1)
    assert "not a duration" in fleet("keys", "create", "--name", "x", "--expires", "soon", code=2)
    assert "Invalid value" in fleet("keys", "create", "--name", "x", "--rpm", "0", code=2)


def test_unreachable_redis_is_reported() -> None:
    result = CliRunner().invoke(app, ["keys", "list", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.output


def test_register_and_unregister_external(fleet, redis_url: str, prefix: str) -> None:
    replica_id = fleet(
        "register", "http://10.1.2.3:8000/", "--model", "llama-70b", "--engine", "sglang"
    ).strip()
    assert replica_id.startswith("ext-")
    again = fleet("register", "http://10.1.2.3:8000", "--model", "llama-70b").strip()
    assert again == replica_id  # same URL, same entry
    replicas = list_replicas_sync(redis_url, prefix)
    assert [(r.id, r.url, r.model, r.managed) for r in replicas] == [
        (replica_id, "http://10.1.2.3:8000", "llama-70b", "external")
    ]
    assert "must start with http" in fleet("register", "10.1.2.3:8000", "--model", "m", code=2)
    assert f"unregistered {replica_id}" in fleet("unregister", replica_id)
    assert list_replicas_sync(redis_url, prefix) == []
    assert "no replica" in fleet("unregister", replica_id, code=1)


def test_register_an_external_embedder(fleet, redis_url: str, prefix: str) -> None:
    replica_id = fleet(
        "register", "http://10.1.2.4:8000", "--model", "e5", "--task", "embed"
    ).strip()
    [info] = list_replicas_sync(redis_url, prefix)
    assert (info.id, info.task) == (replica_id, "embed")
    assert "generate or embed" in fleet(
        "register", "http://h:1", "--model", "m", "--task", "x", code=2
    )
    fleet("unregister", replica_id)


def test_fleet_keys_as_a_real_process(redis_url: str, prefix: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet",
            "keys",
            "create",
            "--name",
            "proc",
            "--redis-url",
            redis_url,
            "--prefix",
            prefix,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("Created API key key_") and lines[-1].startswith("sk-")


def run_fleet(*args: str, redis_url: str, prefix: str) -> subprocess.CompletedProcess:
    """`fleet ...` as a real process writing into a pipe (no COLUMNS: rich would assume 80)."""
    env = {"PATH": "/usr/bin:/bin", "FLEET_REDIS_URL": redis_url, "FLEET_REDIS_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_keys_list_in_a_pipe_shows_whole_names_and_no_warning(redis_url: str, prefix: str) -> None:
    name = "hello-world-a-rather-long-name-for-the-team-that-owns-this-key"
    created = run_fleet("keys", "create", "--name", name, "--models", "llama,qwen,mistral",
                        "--json", redis_url=redis_url, prefix=prefix)  # fmt: skip
    assert created.returncode == 0 and created.stderr == "", created.stderr
    key_id = json.loads(created.stdout)["id"]
    listed = run_fleet("keys", "list", redis_url=redis_url, prefix=prefix)
    assert listed.returncode == 0
    assert listed.stderr == ""  # no redis-py UserWarning about a synchronous Retry
    assert name in listed.stdout and key_id in listed.stdout
    assert "llama,qwen,mistral" in listed.stdout
    assert "…" not in listed.stdout


def test_unreachable_redis_is_one_line_naming_the_flag(prefix: str) -> None:
    result = run_fleet("keys", "list", redis_url="redis://127.0.0.1:1/0", prefix=prefix)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in lines[0] and "--redis-url" in lines[0]
