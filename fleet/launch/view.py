"""Rendering a fleet's status for people: the `fleet status` table and `fleet up`'s live view."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

_STATE_STYLE = {
    "ready": "green",
    "draining": "yellow",
    "starting": "cyan",
    "backoff": "yellow",
    "stopping": "yellow",
    "failed": "bold red",
    "stopped": "dim",
}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: object) -> str:
    return "-" if value is None else str(value)


def replica_table(status: dict) -> Table:
    rows = status.get("replicas", [])
    models = {row.get("model") for row in rows}
    one_model = len(models) == 1
    title = f"replicas of {next(iter(models))}" if one_model else "replicas"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    hosts = {row.get("host") for row in rows}
    columns = ["replica", "state", "run", "wait", "KV", "hit", "served", "rst", "device", "URL"]
    if len(hosts) > 1:
        columns.insert(-1, "host")
    if not one_model:
        columns.insert(1, "model")
    for column in columns:
        table.add_column(column, no_wrap=column in ("replica", "state", "URL"), overflow="fold")
    for row in rows:
        state = row.get("state") or "unknown"
        label: Text | Spinner = Text(state, style=_STATE_STYLE.get(state, ""))
        if state == "starting":
            label = Spinner("dots", text=Text("loading", style="cyan"))
        device = row.get("device") or "-"
        if row.get("gpu") not in (None, ""):
            device = f"{device}:{row['gpu']}"
        cells = [
            _num(row.get("name")),
            label,
            _num(row.get("running")),
            _num(row.get("waiting")),
            _pct(row.get("kv_usage")),
            _pct(row.get("prefix_hit_rate")),
            _num(row.get("requests_served")),
            _num(row.get("restarts")),
            device,
            _num(row.get("url")),
        ]
        if len(hosts) > 1:
            cells.insert(-1, _num(row.get("host")))
        if not one_model:
            cells.insert(1, _num(row.get("model")))
        table.add_row(*cells)
    return table


def router_table(status: dict) -> Table:
    router = status.get("router") or {}
    view = router.get("view") or {}
    table = Table(
        title="router", title_justify="left", show_header=False, box=box.SIMPLE, pad_edge=False
    )
    table.add_column("field")
    table.add_column("value")
    healthy = view.get("healthy")
    table.add_row("url", _num(router.get("url")))
    table.add_row("health", Text("ok" if healthy else "down", style="green" if healthy else "red"))
    queue = view.get("queue")
    if isinstance(queue, dict):
        table.add_row("queue", _queue_line(queue))
    entries = view.get("replicas")
    if isinstance(entries, dict):
        entries = entries.get("replicas", entries.get("data"))
    if isinstance(entries, list):
        routable = [e for e in entries if isinstance(e, dict) and _routable(e)]
        table.add_row("routes to", f"{len(routable)} of {len(entries)} replicas it knows")
        for entry in entries:
            if isinstance(entry, dict):
                table.add_row(f"  {entry.get('id', '?')}", _router_entry(entry))
    return table


def _queue_line(queue: dict) -> str:
    """The router queue: requests waiting now, how long those sent so far waited, refusals."""
    rejections = queue.get("rejections") or {}
    refused = ", ".join(f"{k}={v}" for k, v in rejections.items()) if rejections else "none"
    return (
        f"{_num(queue.get('depth'))} waiting; {_num(queue.get('waited'))} waited "
        f"(mean {_num(queue.get('mean_wait_s'))} s); left unsent: {refused}"
    )


def _routable(entry: dict) -> bool:
    if "routable" in entry:
        return bool(entry["routable"])
    return entry.get("state", "ready") == "ready" and not entry.get("admin_drained")


def _router_entry(entry: dict) -> str:
    keys = ("state", "routable", "healthy", "in_flight", "requests", "failures", "breaker")
    return ", ".join(f"{k}={entry[k]}" for k in keys if k in entry)


def crash_reports(status: dict) -> list[Text]:
    reports = [r for r in [status.get("router", {}).get("process") or {}, *status["replicas"]]
               if r.get("crash_report")]  # fmt: skip
    return [Text(r["crash_report"], style="red") for r in reports]


def fleet_view(status: dict, events: int = 6) -> Group:
    fleet = status.get("fleet") or {}
    header = Text.assemble(
        ("fleet ", "bold"),
        (fleet.get("name", "?"), "bold cyan"),
        f"  {fleet.get('backend', '')}  {fleet.get('phase', '')}  redis {status['redis']['url']}",
    )
    parts: list = [header, router_table(status), replica_table(status), *crash_reports(status)]
    recent = fleet.get("events", [])[-events:]
    if recent:
        parts.append(Text.from_markup("\n".join(recent), style="dim"))
    if status["redis"].get("error"):
        parts.append(Text(f"Redis: {status['redis']['error']}", style="red"))
    return Group(*parts)
