"""Validate response bodies against the official OpenAI API schema (../shared/openai-openapi).

The spec still marks fields with OpenAPI 3.0's `nullable: true`, which JSON Schema 2020-12 ignores;
each such schema becomes `anyOf: [schema, {"type": "null"}]` before validation. When the spec file
is absent (a user's clone has no ../shared), `require_spec()` skips the test with that reason.

    from tests.openai_schema import assert_valid
    assert_valid("CreateCompletionResponse", body)
"""

from __future__ import annotations

from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import pytest

SPEC_PATH = Path(__file__).resolve().parents[3] / "shared" / "openai-openapi" / "openapi.yaml"


def require_spec() -> None:
    if not SPEC_PATH.exists():
        pytest.skip(f"official OpenAI spec not found at {SPEC_PATH} (it lives in ../shared)")


def _nullable_to_anyof(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_to_anyof(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {k: _nullable_to_anyof(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@lru_cache(maxsize=1)
def _spec() -> dict:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC_PATH.open() as f:
        return _nullable_to_anyof(yaml.load(f, Loader=loader))


@cache
def _validator(schema_name: str) -> Any:
    from jsonschema import Draft202012Validator

    spec = _spec()
    if schema_name not in spec["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in the OpenAI spec")
    # The whole document is the root, so "#/components/schemas/..." references resolve.
    root = {"components": spec["components"], "$ref": f"#/components/schemas/{schema_name}"}
    return Draft202012Validator(root)


def assert_valid(schema_name: str, instance: Any) -> None:
    """Fail with every schema violation listed (skips when the spec is absent)."""
    require_spec()
    errors = sorted(_validator(schema_name).iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        lines = [f"  at {'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:10]]
        raise AssertionError(f"response does not match {schema_name}:\n" + "\n".join(lines))
