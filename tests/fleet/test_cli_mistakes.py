"""A user's mistake gets one clear line naming the flag, before anything starts: no traceback, no
restarts, no process or state left behind. Each case runs the real command as a subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_harness import CliResult, fleet_env, run_cli

from fleet.embedded_redis import free_port

DEAD_REDIS = "redis://127.0.0.1:1/0"


def one_line_error(result: CliResult, code: int, *needles: str) -> str:
    """The whole of stderr is one line holding every needle; stdout says nothing."""
    assert result.code == code, result.text
    assert "Traceback" not in result.text and "Warning" not in result.text, result.text
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def nothing_started(run_dir: Path) -> bool:
    return not (run_dir / "state.json").exists() and not (run_dir / "logs").exists()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def env(fleet_cache: Path) -> dict[str, str]:
    return {k: v for k, v in fleet_env(fleet_cache).items() if not k.startswith("FLEET_REDIS")}


def up(env: dict[str, str], run_dir: Path, *args: str) -> CliResult:
    return run_cli("up", "--detach", "--run-dir", str(run_dir), *args, env=env, timeout=60)


def test_up_with_a_missing_model_folder(tmp_path: Path, env: dict[str, str]) -> None:
    began = time.monotonic()
    result = up(env, tmp_path / "run", "--model", "/nonexistent", "--port", str(free_port()))
    one_line_error(result, 2, "--model", "/nonexistent", "no such folder")
    assert time.monotonic() - began < 20  # no replica restarted 6 times first
    assert nothing_started(tmp_path / "run")


def test_up_with_a_folder_that_is_not_a_model(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for model, why in [(tmp_path / "empty", "config.json"), (tmp_path / "file", "not a folder")]:
        result = up(env, tmp_path / "run", "--model", str(model), "--port", str(free_port()))
        one_line_error(result, 2, "--model", str(model), why)
    assert nothing_started(tmp_path / "run")


def test_up_with_the_router_port_in_use(tmp_path: Path, env: dict[str, str], busy_port) -> None:
    result = up(env, tmp_path / "run", "--port", str(busy_port))
    one_line_error(result, 2, "--port", str(busy_port), "in use")
    assert nothing_started(tmp_path / "run")


def test_up_with_an_unreachable_redis(tmp_path: Path, env: dict[str, str]) -> None:
    result = up(env, tmp_path / "run", "--redis-url", DEAD_REDIS, "--port", str(free_port()))
    one_line_error(result, 2, "--redis-url", "127.0.0.1:1", "cannot reach Redis")
    assert nothing_started(tmp_path / "run")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--port", "0"], ["--port", "router.port", "greater than or equal to 1"]),
        (["--set", "router.port=abc"], ["--set router.port", "valid integer"]),
        (["--set", "models.0.bogus=1"], ["--set models.0.bogus", "not permitted"]),
        (["--max-num-seqs", "0"], ["--max-num-seqs", "max_num_seqs"]),
        (["--redis-url", "localhost:6379"], ["--redis-url", "redis://"]),
    ],
)
def test_up_with_a_bad_spec_field(
    tmp_path: Path, env: dict[str, str], args: list[str], needles: list[str]
) -> None:
    one_line_error(up(env, tmp_path / "run", *args), 2, *needles)
    assert nothing_started(tmp_path / "run")


def test_a_bad_field_in_the_spec_file_names_the_file(tmp_path: Path, env: dict[str, str]) -> None:
    spec = tmp_path / "fleet.yaml"
    spec.write_text("router:\n  policy: fastest\n")
    one_line_error(up(env, tmp_path / "run", str(spec)), 2, str(spec), "router.policy")


def server(module: str, *args: str) -> CliResult:
    """`fleet replica|router ...` as a user runs it, timed out if it starts serving instead."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "fleet", module, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def test_replica_with_a_missing_model_folder() -> None:
    port = free_port()
    result = server("replica", "--model", "/nonexistent", "--port", str(port))
    one_line_error(result, 2, "fleet replica", "--model", "/nonexistent", "no such folder")
    assert port_is_free(port)


def test_replica_with_a_model_that_is_not_in_the_offline_cache() -> None:
    result = server("replica", "--model", "nobody/no-such-model", "--port", str(free_port()))
    one_line_error(result, 2, "--model", "nobody/no-such-model", "HF_HUB_OFFLINE")


def test_replica_and_router_with_their_port_in_use(tiny_model: Path, busy_port: int) -> None:
    result = server("replica", "--model", str(tiny_model), "--port", str(busy_port))
    one_line_error(result, 2, "fleet replica", "--port", str(busy_port), "in use")
    result = server("router", "--replica", "http://127.0.0.1:9", "--port", str(busy_port))
    one_line_error(result, 2, "fleet router", "--port", str(busy_port), "in use")


def test_servers_with_a_malformed_redis_url(tiny_model: Path) -> None:
    port = free_port()
    result = server("router", "--redis-url", "localhost:6379", "--port", str(port))
    one_line_error(result, 2, "fleet router", "--redis-url", "redis://")
    result = server("replica", "--model", str(tiny_model), "--redis-url", "localhost:6379")
    one_line_error(result, 2, "fleet replica", "--redis-url", "redis://")
    assert port_is_free(port)


def test_router_without_replicas_or_redis() -> None:
    one_line_error(server("router"), 2, "fleet router", "--replica", "--redis-url")


def test_server_flag_errors_are_usage_errors() -> None:
    """Click's usage errors, in the same rich panel as `fleet up --port eighty`."""
    result = server("router", "--port", "eighty")
    assert result.code == 2 and "Traceback" not in result.text
    assert "Invalid value for '--port'" in result.err and "Usage: fleet router" in result.err
    result = server("replica", "--model", "m", "--policy", "x")
    assert result.code == 2 and "No such option" in result.err
