"""Prometheus file-based service discovery for a running fleet: the router and every replica.

Replica ports are chosen at start and replicas move (scale, Ray restarts), so the manager rewrites
RUN_DIR/prometheus-targets.json whenever the fleet changes; deploy/monitoring/prometheus.yml reads
it with `file_sd_configs`, and Prometheus picks up changes by itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from fleet.launch.state import ProcessRecord


def scrape_targets(fleet: str, records: list[ProcessRecord]) -> list[dict]:
    groups = []
    for record in records:
        if record.kind not in ("router", "replica") or not record.url:
            continue
        labels = {"fleet": fleet, "component": record.kind, "replica": record.name}
        if record.model:
            labels["model"] = record.model
        groups.append({"targets": [urlsplit(record.url).netloc], "labels": labels})
    return groups


def write_scrape_targets(path: Path, fleet: str, records: list[ProcessRecord]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(scrape_targets(fleet, records), indent=2))
    os.replace(tmp, path)
