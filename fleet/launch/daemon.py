"""`python -m fleet.launch.daemon RUN_DIR`: the background fleet manager behind `fleet up --detach`.

It reads the spec that `fleet up` wrote to RUN_DIR/spec.json and runs the fleet until `fleet down`
(control socket or SIGTERM). Its own output goes to RUN_DIR/logs/manager.log.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from fleet.launch.manager import FleetManager
from fleet.launch.runner import run_fleet
from fleet.spec import FleetSpec

SPEC_FILE = "spec.json"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fleet.launch.daemon RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    spec = FleetSpec.model_validate_json((run_dir / SPEC_FILE).read_text())
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    return asyncio.run(run_fleet(FleetManager(spec, run_dir)))


if __name__ == "__main__":
    sys.exit(main())
