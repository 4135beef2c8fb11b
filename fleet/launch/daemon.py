"""`python -m fleet.launch.daemon RUN_DIR [PARENT_PID]`: the fleet manager process behind `fleet up`.

It reads the spec that `fleet up` wrote to RUN_DIR/spec.json and runs the fleet until `fleet down`
(manager socket or SIGTERM), or, for a foreground `fleet up`, until PARENT_PID exits. It runs in its
own session so a Ctrl-C in the terminal reaches only `fleet up`, which then asks for an orderly
stop. Its own output goes to RUN_DIR/logs/manager.log.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from fleet.launch.manager import FleetManager
from fleet.launch.runner import run_fleet
from fleet.launch.state import SPEC_FILE
from fleet.spec import FleetSpec


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m fleet.launch.daemon RUN_DIR [PARENT_PID]", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    parent = int(args[1]) if len(args) == 2 else None
    spec = FleetSpec.model_validate_json((run_dir / SPEC_FILE).read_text())
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # status polls would flood the log
    return asyncio.run(run_fleet(FleetManager(spec, run_dir), parent))


if __name__ == "__main__":
    sys.exit(main())
