"""`fleet make-model`: write a tiny or small random-weight model folder, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from fleet import model_factory


def register(app: typer.Typer) -> None:
    @app.command("make-model")
    def make_model(
        path: Path = typer.Argument(..., help="Folder to write (replaced if it exists)."),
        arch: str = typer.Option("llama", help="llama, qwen2, qwen3 or mistral."),
        size: str = typer.Option("tiny", help="tiny (<1M parameters) or small (~100M)."),
        seed: int = typer.Option(0, help="Seed of the random weights."),
        dtype: str = typer.Option(None, help="Weights dtype (default: float32 tiny, bf16 small)."),
    ) -> None:
        """Build a Hugging Face model folder with random weights and a locally trained tokenizer."""
        try:
            folder = model_factory.make_model(path, arch=arch, size=size, seed=seed, dtype=dtype)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        typer.echo(str(folder))
