"""The Lua scripts behind admission, settlement and key changes, loaded from scripts/*.lua.

Each runs atomically in Redis, so routers sharing a key never race on its limits or its record.
"""

from __future__ import annotations

from importlib.resources import files

from fleet.control.resp import LuaScript


def _source(name: str) -> str:
    return (files("fleet.control.keys") / "scripts" / f"{name}.lua").read_text(encoding="utf-8")


# One tick's admissions and settlements (fleet.control.keys.batch).
BATCH = LuaScript(_source("window") + _source("admit") + _source("settle") + _source("batch"))
VOID = LuaScript(_source("void"))
LOOKUP = LuaScript(_source("lookup"))
# Run through redis-py's `register_script` by the admin side, which is not on the hot path.
REPLACE_SOURCE = _source("replace")
