"""fleetserve's control plane (Redis membership, API keys) and the `fleet` command."""

__version__ = "0.1.0"
