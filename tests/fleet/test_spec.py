"""The fleet spec: YAML parsing, defaults, dotted overrides (the flags) and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.spec import (
    FleetSpec,
    ModelSpec,
    SpecError,
    dump_spec,
    load_spec,
    parse_assignment,
    replica_count,
    replica_device,
    run_dir,
)


def test_empty_spec_is_the_default_fleet() -> None:
    spec = load_spec()
    assert spec == FleetSpec()
    assert spec.backend == "local" and spec.redis.url is None and spec.keys.enabled
    assert (spec.router.host, spec.router.port, spec.router.policy) == ("127.0.0.1", 8000, "prefix")
    (model,) = spec.models
    assert model.path is None and model.replicas == "auto"
    assert replica_count(model, gpus=0) == 2 and replica_device(model, gpus=0) == "cpu"
    assert replica_count(model, gpus=8) == 8 and replica_device(model, gpus=8) == "cuda"


def test_yaml_spec_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        """
name: demo
router: {port: 9000, policy: least-load}
redis: {url: "redis://10.0.0.5:6379/0"}
keys: {enabled: false}
models:
  - path: /models/llama
    served_model_name: llama
    replicas: 3
    dtype: bfloat16
    kv_cache_tokens: 4096
    args: ["--max-num-seqs", "64"]
  - path: /models/qwen
    device: cpu
"""
    )
    spec = load_spec(path, {"router.port": 9100, "models.*.max_model_len": 1024})
    assert spec.name == "demo" and spec.router.port == 9100 and spec.router.policy == "least-load"
    assert spec.redis.url == "redis://10.0.0.5:6379/0" and not spec.keys.enabled
    llama, qwen = spec.models
    assert llama.replicas == 3 and qwen.replicas == "auto"
    assert replica_count(qwen, gpus=4) == 2  # a CPU model ignores the GPUs
    assert llama.engine_flags() == [
        "--dtype", "bfloat16", "--max-model-len", "1024", "--kv-cache-tokens", "4096",
        "--max-num-seqs", "64",
    ]  # fmt: skip
    assert qwen.display_name() == "qwen" and llama.display_name() == "llama"
    assert spec.find_model("llama") == 0 and spec.find_model("qwen") == 1
    with pytest.raises(SpecError, match="no model named 'mistral'"):
        spec.find_model("mistral")
    assert load_spec(_write(tmp_path, dump_spec(spec))) == spec  # round trip


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("router: {port: 70000}", "router.port: Input should be less than or equal to 65535"),
        ("backend: kubernetes", "backend: Input should be 'local' or 'ray'"),
        ("models: [{replicas: -1}]", "models.0.replicas"),
        ("models: [{replicas: many}]", "models.0.replicas"),
        ("models: [{dtype: float8}]", "models.0.dtype"),
        ("models: []", "at least one model"),
        ("routr: {port: 1}", "routr: Extra inputs are not permitted"),
        ("redis: {url: 'localhost:6379'}", "redis.url: Value error, must be a redis://"),
        ("name: My_Fleet", "name: Value error, use lowercase"),
        ("ray_address: auto", "ray_address is only meaningful with backend: ray"),
        ("models: [{path: a}, {path: a}]", "served names must differ"),
        ("- a\n- b", "must be a mapping"),
        ("router: {port: [", "not valid YAML"),
    ],
)
def test_invalid_specs_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError, match=_escape(message)):
        load_spec(_write(tmp_path, text))


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")


def test_set_assignments_parse_values_as_yaml() -> None:
    assert parse_assignment("router.port=9000") == ("router.port", 9000)
    assert parse_assignment("keys.enabled=false") == ("keys.enabled", False)
    assert parse_assignment("models.0.args=[--seed, '1']") == ("models.0.args", ["--seed", "1"])
    assert parse_assignment("redis.url=redis://h:1/0") == ("redis.url", "redis://h:1/0")
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        parse_assignment("router.port")
    spec = load_spec(None, dict([parse_assignment("models.0.replicas=3")]))
    assert spec.models[0].replicas == 3
    with pytest.raises(SpecError, match=r"models\.5\.replicas: '5' is not an index"):
        load_spec(None, {"models.5.replicas": 1})


def test_run_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    assert run_dir() == tmp_path / "home"
    assert run_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("FLEET_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert run_dir() == tmp_path / "cache" / "fleetserve" / "run"


def test_model_spec_defaults_pass_no_engine_flags() -> None:
    assert ModelSpec().engine_flags() == []
