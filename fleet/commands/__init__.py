"""Subcommands of `fleet`, one module per group; each exposes `register(app)`."""
