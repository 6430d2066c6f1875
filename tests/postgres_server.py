"""A real PostgreSQL server for tests (issue 21 item 1): `initdb` and `pg_ctl` into a
fresh temporary folder, listening on 127.0.0.1 only, stopped and removed afterwards.

Production Prefect servers keep their state in PostgreSQL (docs/operations.md); the
operations and reliability tests run their `prefect server start` on one of these.

initdb and postgres refuse to run as root. Tests run as root in CI, so as root the
server's commands run as the unprivileged user `nobody` (with `setpriv`), which owns the
temporary folder. Authentication is by a random password (scram-sha-256) on loopback;
the unix socket lies in the temporary folder, which only that user can enter.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import s3_server

USER = "prefect"
DATABASE = "prefect"
UNPRIVILEGED = "nobody"
START_TIMEOUT_S = 120


@dataclass(frozen=True)
class PostgresServer:
    """A running server: where it listens, its superuser's password, its folders."""

    port: int
    password: str
    data: Path
    socket_dir: Path
    pid: int
    host: str = "127.0.0.1"
    user: str = USER
    database: str = DATABASE

    def url(self, driver: str = "postgresql+asyncpg") -> str:
        """The connection URL of the database, as Prefect's
        PREFECT_API_DATABASE_CONNECTION_URL takes it."""
        return (f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/"
                f"{self.database}")


def fetch(server: PostgresServer, sql: str, *args) -> list[tuple]:
    """The rows of one query on the server's database (asyncpg, as Prefect connects)."""
    import asyncio

    import asyncpg

    async def rows() -> list[tuple]:
        connection = await asyncpg.connect(server.url("postgresql"))
        try:
            return [tuple(row) for row in await connection.fetch(sql, *args)]
        finally:
            await connection.close()

    return asyncio.run(rows())


def bindir() -> Path | None:
    """The folder of `initdb`, `pg_ctl` and `postgres`: Debian keeps them in
    /usr/lib/postgresql/<version>/bin, off PATH (only pg_config or a link may be on it)."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                   timeout=30)
            candidates.append(Path(found.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    # The newest version first (numerically: 9.6 < 15).
    versions.sort(key=lambda p: [int(x) if x.isdigit() else 0
                                 for x in Path(p).parent.name.split(".")], reverse=True)
    candidates += [Path(p) for p in versions]
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def missing_reason() -> str | None:
    """Why no server can be started here, or None when one can."""
    if bindir() is None:
        return ("PostgreSQL is not installed (no initdb/pg_ctl on PATH, from pg_config "
                "or in /usr/lib/postgresql/*/bin): apt-get install postgresql")
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            return "running as root, and setpriv (util-linux) is missing to drop to nobody"
        try:
            pwd.getpwnam(UNPRIVILEGED)
        except KeyError:
            return f"running as root, and there is no user {UNPRIVILEGED!r} to run postgres"
    return None


def _as_server_user() -> list[str]:
    """The prefix that runs a command as the server's user: ourselves, or `nobody` when
    we are root (initdb and postgres refuse to run as root)."""
    if os.geteuid() != 0:
        return []
    entry = pwd.getpwnam(UNPRIVILEGED)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
            "--clear-groups", "--"]


def _traversable_tmp() -> str:
    """A folder for the server's temporary folder that the server's user can reach:
    the usual temporary folder unless some folder above it is closed to others (as
    /tmp/pytest-of-root is), then /tmp."""
    base = Path(tempfile.gettempdir()).resolve()
    if os.geteuid() == 0:
        for folder in (base, *base.parents):
            if not folder.stat().st_mode & 0o001:
                return "/tmp"
    return str(base)


def _run(args: list, env: dict, cwd: Path, what: str, timeout: float = 120) -> None:
    done = subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (status {done.returncode}):\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().splitlines()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int, timeout: float = 10) -> None:
    """SIGKILL the postmaster (its children exit when it is gone) and wait for it."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


@contextmanager
def running(timeout: float = START_TIMEOUT_S) -> Iterator[PostgresServer]:
    """Start a PostgreSQL server in a fresh temporary folder, with the database
    `prefect` owned by the superuser `prefect`; stop it (`pg_ctl stop -m fast`, else
    SIGKILL) and remove the folder on leaving."""
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)
    bin_ = bindir()
    assert bin_ is not None
    root = Path(tempfile.mkdtemp(prefix="dreg-postgres-", dir=_traversable_tmp()))
    data, socket_dir = root / "data", root / "socket"
    password = secrets.token_hex(16)
    prefix = _as_server_user()
    # A locale that every machine has; no variable of ours (PG*) steers the tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"LC_ALL": "C", "LANG": "C"})
    pid = None
    try:
        socket_dir.mkdir()
        (root / "password").write_text(password + "\n")
        if prefix:
            entry = pwd.getpwnam(UNPRIVILEGED)
            for path in (root, socket_dir, root / "password"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        _run([*prefix, bin_ / "initdb", "-D", data, "-U", USER, "--auth=scram-sha-256",
              f"--pwfile={root / 'password'}", "--encoding=UTF8", "--locale=C",
              "--no-sync", "--no-instructions"], env, root, "initdb")
        (root / "password").unlink()
        port = s3_server.free_port()
        # Loopback only, the socket in our folder; fsync off: a test server's data
        # need not survive a power cut, and it saves seconds on a loaded machine.
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {socket_dir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        _run([*prefix, bin_ / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-w",
              "-t", int(timeout), "-o", options, "start"], env, root, "pg_ctl start",
             timeout=timeout + 30)
        pid = _postmaster_pid(data)
        assert pid is not None, "pg_ctl started no postmaster"
        client_env = {**env, "PGPASSWORD": password}
        _run([bin_ / "createdb", "-h", "127.0.0.1", "-p", port, "-U", USER, DATABASE],
             client_env, root, "createdb")
        yield PostgresServer(port=port, password=password, data=data,
                             socket_dir=socket_dir, pid=pid)
    finally:
        pid = pid or _postmaster_pid(data)
        if pid is not None and _alive(pid):
            try:
                _run([*prefix, bin_ / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "30",
                      "stop"], env, root, "pg_ctl stop", timeout=60)
            except (RuntimeError, subprocess.SubprocessError):
                pass
            if _alive(pid):
                _kill(pid)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the module (issue 21 item 1); skipped where PostgreSQL
    is not installed."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with running() as server:
        yield server
