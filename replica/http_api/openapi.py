"""The replica's own OpenAPI 3.1 document (served at /openapi.json), e.g. for API fuzzers.

Request bodies come straight from the pydantic models that validate them, so the document cannot
drift from what the server accepts; responses are described at the level a client relies on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from replica.http_api.info_routes import VERSION
from replica.http_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)

_OBJECT = {"type": "object"}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_RESPONSES = {
    "Error": _ERROR,
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {"object": {"const": "text_completion"}, "usage": _OBJECT},
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {"object": {"const": "chat.completion"}, "usage": _OBJECT},
    },
    "Embeddings": {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array"}, "usage": _OBJECT},
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array"}},
    },
    "Tokens": {
        "type": "object",
        "required": ["tokens", "count", "max_model_len"],
        "properties": {"tokens": {"type": "array", "items": {"type": "integer"}}},
    },
    "Text": {
        "type": "object",
        "required": ["prompt"],
        "properties": {"prompt": {"type": "string"}},
    },
}


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    summary: str
    request: type[BaseModel] | None = None
    response: str | None = None
    streams: bool = False
    protected: bool = True


OPERATIONS = (
    Operation("/v1/completions", "post", "Create a completion", CompletionRequest, "Completion", True),
    Operation("/v1/chat/completions", "post", "Create a chat completion", ChatCompletionRequest,
              "ChatCompletion", True),
    Operation("/v1/embeddings", "post", "Create embeddings (a replica started with --task embed)",
              EmbeddingRequest, "Embeddings"),
    Operation("/v1/models", "get", "List the served model", response="ModelList"),
    Operation("/v1/models/{model}", "get", "Describe the served model"),
    Operation("/tokenize", "post", "Prompt or messages to token ids", TokenizeRequest, "Tokens"),
    Operation("/detokenize", "post", "Token ids to text", DetokenizeRequest, "Text"),
    Operation("/health", "get", "200 when taking work, 503 when loading or draining", protected=False),
    Operation("/load", "get", "Queue depth, KV usage and prefix-cache counters", protected=False),
    Operation("/metrics", "get", "Prometheus metrics", protected=False),
    Operation("/version", "get", "Server version", protected=False),
    Operation("/server_info", "get", "SGLang's worker facts (its model gateway reads them)"),
    Operation("/model_info", "get", "SGLang's model facts (its model gateway reads them)"),
)  # fmt: skip


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    models: list[tuple[type[BaseModel], Literal["validation"]]] = [
        (op.request, "validation") for op in OPERATIONS if op.request is not None
    ]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas = {**defs.get("$defs", {}), **_RESPONSES}
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "fleetserve replica", "version": VERSION},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _operation(op: Operation) -> dict:
    error = {"content": {"application/json": {"schema": _ref("Error")}}}
    ok: dict = {"description": "OK"}
    if op.response:
        ok["content"] = {"application/json": {"schema": _ref(op.response)}}
    if op.streams:
        ok.setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"}}
    responses: dict = {"200": ok}
    if op.request is not None:
        responses["400"] = {"description": "Invalid request", **error}
        responses["413"] = {"description": "Body too large", **error}
    if op.protected:
        responses["401"] = {"description": "Missing or wrong API key", **error}
        responses["404"] = {"description": "Unknown model", **error}
    if op.path.startswith("/v1/") and op.method == "post":
        responses["503"] = {"description": "Draining or overloaded; retry", **error}
    out: dict = {"summary": op.summary, "responses": responses}
    if op.protected:
        out["security"] = [{"bearer": []}]
    if op.path == "/v1/models/{model}":
        out["parameters"] = [
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    if op.request is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(op.request.__name__)}},
        }
    return out
