"""`fleet register URL --model NAME` and `fleet unregister ID`: engines we do not run ourselves.

An external replica (a vLLM or SGLang server) has no lease: it stays registered until
unregistered, and the routers' health checks decide whether it gets traffic.
"""

from __future__ import annotations

import hashlib

import typer

from fleet.commands.keys import JSON, PREFIX, REDIS_URL, echo_json, run_redis
from fleet.control.membership import ReplicaInfo, register_external, unregister
from fleet.control.redis_conn import resolve_prefix


def external_id(url: str) -> str:
    """Stable id from the URL, so registering the same server twice updates one entry."""
    return "ext-" + hashlib.sha256(url.encode()).hexdigest()[:10]


def register(app: typer.Typer) -> None:
    @app.command("register")
    def register_cmd(
        url: str = typer.Argument(..., help="Base URL of the OpenAI-compatible server."),
        model: str = typer.Option(..., "--model", help="Model name it serves."),
        engine: str = typer.Option("vllm", "--engine", help="vllm, sglang, fleetserve, ..."),
        replica_id: str = typer.Option(None, "--id", help="Replica id (default: from the URL)."),
        max_model_len: int = typer.Option(0, "--max-model-len", min=0, help="Context length."),
        device: str = typer.Option("cuda", "--device", help="Device it runs on (informative)."),
        task: str = typer.Option(
            None,
            "--task",
            help="generate or embed: routers send it only that task's requests (default: both).",
        ),
        redis_url: str = REDIS_URL,
        prefix: str = PREFIX,
        as_json: bool = JSON,
    ) -> None:
        """Add an external replica to the fleet (no lease; routers health-check it)."""
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise typer.BadParameter("must start with http:// or https://", param_hint="URL")
        if task not in (None, "generate", "embed"):
            raise typer.BadParameter("must be generate or embed", param_hint="--task")
        info = ReplicaInfo(
            id=replica_id or external_id(url),
            url=url,
            model=model,
            engine=engine,
            device=device,
            host="",
            max_model_len=max_model_len,
            task=task,
        )
        info = run_redis(redis_url, lambda c: register_external(c, info, resolve_prefix(prefix)))
        if as_json:
            echo_json(info.__dict__)
        else:
            typer.echo(info.id)

    @app.command("unregister")
    def unregister_cmd(
        replica_id: str = typer.Argument(..., help="Replica id."),
        redis_url: str = REDIS_URL,
        prefix: str = PREFIX,
    ) -> None:
        """Remove a replica from the fleet (external or leased)."""
        existed = run_redis(redis_url, lambda c: unregister(c, replica_id, resolve_prefix(prefix)))
        if not existed:
            typer.echo(f"error: no replica with id '{replica_id}'", err=True)
            raise typer.Exit(1)
        typer.echo(f"unregistered {replica_id}")
