"""The PostgreSQL test harness itself (tests/postgres_server.py; issue 21 item 1)."""

from __future__ import annotations

import asyncio
import os

import postgres_server
import psutil
import pytest

pytestmark = [pytest.mark.full, pytest.mark.skipif(
    postgres_server.missing_reason() is not None,
    reason=f"needs PostgreSQL: {postgres_server.missing_reason()}")]


async def _query(url: str) -> tuple[str, str, str]:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        return (await connection.fetchval("select current_database()"),
                await connection.fetchval("show listen_addresses"),
                await connection.fetchval("select current_user"))
    finally:
        await connection.close()


def test_server_answers_on_loopback_only_and_leaves_nothing():
    """issue 21 item 1: a real server starts in a temporary folder, answers a query on
    127.0.0.1 with its password, listens nowhere else, runs unprivileged when we are
    root, and leaves no process or folder behind."""
    with postgres_server.running() as server:
        assert asyncio.run(_query(server.url("postgresql"))) == ("prefect", "127.0.0.1",
                                                                  "prefect")
        postmaster = psutil.Process(server.pid)
        processes = [postmaster, *postmaster.children(recursive=True)]
        listening, users = set(), set()
        for process in processes:
            try:   # the backend of the query above may be exiting
                listening |= {c.laddr for c in process.net_connections("inet")
                              if c.status == psutil.CONN_LISTEN}
                users.add(process.username())
            except psutil.NoSuchProcess:
                continue
        assert listening == {("127.0.0.1", server.port)}
        if os.geteuid() == 0:
            assert users == {postgres_server.UNPRIVILEGED}
        # The password is needed: a wrong one is refused.
        wrong = server.url("postgresql").replace(server.password, "wrong")
        with pytest.raises(Exception, match="password"):
            asyncio.run(_query(wrong))
        pids = [p.pid for p in processes]
        folder = server.data.parent
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    assert not folder.exists()
