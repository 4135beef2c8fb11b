"""How every `fleet` command that runs a fleet writes: rich on stdout, one-line errors on stderr."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

# Piped output (logs, CI, grep) is not held to rich's default 80 columns, where the status tables
# squeeze their short columns into vertical headers: one line per replica instead.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr (never wrapped at 80 columns, the message never read as markup)."""
    err.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)
