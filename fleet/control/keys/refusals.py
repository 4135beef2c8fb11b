"""The errors a key check or limit answers with, each counted by reason.

Metric: fleet_control_key_rejections_total{reason} (reason: invalid, revoked, expired, model,
rpm, tpm, concurrency, unavailable).
"""

from __future__ import annotations

import math

from prometheus_client import Counter

from fleet.control.errors import APIError

KEY_REJECTIONS = Counter(
    "fleet_control_key_rejections", "Requests refused by API key checks and limits", ["reason"]
)

# What the admission script's refusal codes mean: (metric reason, the limit as users know it).
RPM, TPM, CONCURRENCY = 1, 2, 3
_LIMITS = {
    RPM: ("rpm", "requests per minute (rpm)"),
    TPM: ("tpm", "tokens per minute (tpm)"),
    CONCURRENCY: ("concurrency", "concurrent requests (max_concurrent)"),
}


def unauthorized(reason: str, message: str) -> APIError:
    KEY_REJECTIONS.labels(reason).inc()
    return APIError(401, message, code="invalid_api_key")


def model_not_allowed(key_name: str, model: str | None) -> APIError:
    KEY_REJECTIONS.labels("model").inc()
    return APIError(
        403,
        f"The API key '{key_name}' may not use the model '{model}'.",
        param="model",
        code="model_not_allowed",
    )


def rate_limited(key_name: str, key_id: str, code: int, retry_ms: int, limit: int) -> APIError:
    """A 429 naming the limit (`code`: RPM, TPM or CONCURRENCY) and when to retry."""
    reason, what = _LIMITS[code]
    KEY_REJECTIONS.labels(reason).inc()
    retry_s = max(1, math.ceil(retry_ms / 1000))
    return APIError(
        429,
        f"Rate limit reached for API key '{key_name}' ({key_id}) on {what}: {limit}. "
        f"Retry after {retry_s} s.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_s)},
    )


def unavailable() -> APIError:
    """Fail closed: a key unknown here cannot be checked while Redis is unreachable."""
    KEY_REJECTIONS.labels("unavailable").inc()
    return APIError(
        503,
        "The API key could not be verified: the control plane is unavailable. Retry shortly.",
        code="control_plane_unavailable",
        headers={"Retry-After": "1"},
    )
