"""A Prefect database already at the newest schema, to start fresh SQLite-backed servers
from (the temporary API server of a `dreg` command with a fresh PREFECT_HOME, and
`prefect server start` in reliability_helpers).

A new SQLite database is brought to Prefect's schema by its migrations at the server's
first start: about 9 s on this 2-core machine, paid again by every test that starts a
server in a fresh folder. The tests copy a migrated database instead, made once per
Prefect version by `prefect server database upgrade` (a real migration, shared between
test processes under a lock), so each server starts as it does on a user's second run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

BIN = Path(sys.executable).parent
NAME = "prefect.db"


def template() -> Path:
    """The migrated database for this Prefect version (made on first use)."""
    folder = (Path(tempfile.gettempdir())
              / f"dreg-test-prefect-db-{os.getuid()}-{version('prefect')}")
    folder.mkdir(mode=0o700, exist_ok=True)
    database = folder / NAME
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            making = folder / "making"
            shutil.rmtree(making, ignore_errors=True)
            making.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
            env.update({"PREFECT_HOME": str(making), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_API_DATABASE_CONNECTION_URL":
                            f"sqlite+aiosqlite:///{making / NAME}"})
            done = subprocess.run([str(BIN / "prefect"), "server", "database", "upgrade", "-y"],
                                  env=env, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError("prefect server database upgrade failed:\n"
                                   f"{done.stderr[-3000:]}")
            os.replace(making / NAME, database)  # whole, or not there
            shutil.rmtree(making, ignore_errors=True)
    return database


def seeded(database: Path) -> Path:
    """`database` (a path to an SQLite file that does not exist yet) as a copy of the
    migrated template; its folder is made if needed."""
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template(), database)
    return database


def seeded_home(home: Path) -> Path:
    """A PREFECT_HOME whose temporary API server starts on a migrated database."""
    seeded(home / NAME)
    return home
