"""The fleet dashboard: a live page at `/dashboard` for operators (see routes.py)."""

from router.dashboard.routes import Dashboard

__all__ = ["Dashboard"]
