"""Five JSON schemas for structured-output tests and benchmarks (nested objects, arrays, enums,
numbers), each with a valid instance, and the OpenAI `response_format` that asks for it.

Every string, array and number is bounded (maxLength, maxItems, ranges, enums), so a grammar built
from them is finite: even a random model must close the JSON within `MAX_TOKENS`.
"""

from __future__ import annotations

from typing import Any

# Enough for the longest answer any schema here allows, even one token per byte (about 330 bytes:
# bounded strings of 3-byte characters, 4 forecast days, 6 fraction digits per number). Over 600
# sampled answers of the tiny random model the longest took 214 tokens.
MAX_TOKENS = 500

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}

ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    "price": {"type": "number", "minimum": 0, "maximum": 1000},
                },
                "required": ["sku", "qty", "price"],
                "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
    },
    "required": ["id", "items", "paid"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "forecast": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
                    "high": {"type": "number", "minimum": -60, "maximum": 60},
                    "low": {"type": "number", "minimum": -60, "maximum": 60},
                },
                "required": ["day", "high", "low"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["city", "unit", "forecast"],
    "additionalProperties": False,
}

EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "location": {
            "type": "object",
            "properties": {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "minimum": -180, "maximum": 180},
                "venue": {"type": "object", "properties": {
                    "name": {"type": "string", "maxLength": 10},
                    "indoor": {"type": "boolean"},
                }, "required": ["name", "indoor"], "additionalProperties": False},
            },
            "required": ["lat", "lon", "venue"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 8}},
    },
    "required": ["title", "location", "tags"],
    "additionalProperties": False,
}  # fmt: skip

REVIEW = {
    "type": "object",
    "properties": {
        "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "scores": {
            "type": "array",
            "minItems": 2,
            "maxItems": 2,
            "items": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "reviewer": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 10}]},
    },
    "required": ["rating", "sentiment", "scores", "reviewer"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": PERSON,
    "order": ORDER,
    "weather": WEATHER,
    "event": EVENT,
    "review": REVIEW,
}

EXAMPLES: dict[str, Any] = {
    "person": {"name": "Ada", "age": 36, "role": "admin"},
    "order": {"id": 42, "items": [{"sku": "ABC-123", "qty": 2, "price": 9.5}], "paid": True},
    "weather": {
        "city": "Paris",
        "unit": "celsius",
        "forecast": [{"day": "mon", "high": 21.5, "low": 12}, {"day": "tue", "high": 19, "low": 9}],
    },
    "event": {
        "title": "Launch party",
        "location": {"lat": 48.85, "lon": 2.35, "venue": {"name": "Loft", "indoor": True}},
        "tags": ["fun", "tech"],
    },
    "review": {"rating": 4, "sentiment": "positive", "scores": [0.8, 0.25], "reviewer": None},
}


def response_format(name: str) -> dict[str, Any]:
    """OpenAI's `response_format` asking for schema `name`, strictly."""
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
    }
