"""Turn a replica's `/load` JSON or a vLLM/SGLang `/metrics` page into one `LoadReport`.

One engine may report several series of a name (vLLM per engine, SGLang per data-parallel rank):
counts add up over them; KV usage is a fraction of each one's cache, so it is their mean."""

from __future__ import annotations

import time
from typing import TypedDict

from router.backends.backend import LoadReport

_METRIC_NAMES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:generation_tokens_total": "generation_tokens",
    "sglang:num_running_reqs": "running",
    "sglang:num_queue_reqs": "waiting",
    "sglang:token_usage": "kv_usage",
    "sglang:prompt_tokens_total": "prefix_cache_queries",
    "sglang:cached_tokens_total": "prefix_cache_hits",  # per cache_source in newer SGLang
    "sglang:generation_tokens_total": "generation_tokens",
}
_FRACTIONS = frozenset({"kv_usage"})


class LoadJSON(TypedDict, total=False):
    """A fleetserve replica's `/load` answer (replica.http_api.info_routes.load), the fields
    read here; each is read defensively, a missing or null one counting as 0."""

    running: int
    waiting: int
    kv_usage: float
    kv_capacity_tokens: int
    block_size: int
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    generation_tokens: int


def from_load_json(data: LoadJSON) -> LoadReport:
    block_size = int(data.get("block_size") or 0)
    num_blocks = int(data.get("num_blocks") or 0)
    return LoadReport(
        running=int(data.get("running") or 0),
        waiting=int(data.get("waiting") or 0),
        kv_usage=float(data.get("kv_usage") or 0.0),
        kv_capacity_tokens=int(data.get("kv_capacity_tokens") or block_size * num_blocks),
        prefix_cache_queries=int(data.get("prefix_cache_queries") or 0),
        prefix_cache_hits=int(data.get("prefix_cache_hits") or 0),
        generation_tokens=int(data.get("generation_tokens") or 0),
        updated_at=time.monotonic(),
    )


def from_prometheus_text(text: str) -> LoadReport:
    """Each known series over its labels: summed, or averaged for fractions."""
    values: dict[str, float] = {}
    series: dict[str, int] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        field = _METRIC_NAMES.get(line[:name_end])
        if field is None:
            continue
        rest = line[line.rfind("}") + 1 :] if line[name_end] == "{" else line[name_end:]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        values[field] = values.get(field, 0.0) + value
        series[field] = series.get(field, 0) + 1
    for field in _FRACTIONS & values.keys():
        values[field] /= series[field]
    return LoadReport(
        running=int(values.get("running", 0)),
        waiting=int(values.get("waiting", 0)),
        kv_usage=values.get("kv_usage", 0.0),
        prefix_cache_queries=int(values.get("prefix_cache_queries", 0)),
        prefix_cache_hits=int(values.get("prefix_cache_hits", 0)),
        generation_tokens=int(values.get("generation_tokens", 0)),
        updated_at=time.monotonic(),
    )
