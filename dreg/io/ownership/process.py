"""Whether a lease's owner process provably died: the owner on this very machine.

A lease record names the process that holds it: host name, boot id
(``/proc/sys/kernel/random/boot_id``, new at every boot), pid namespace (two containers
on one kernel share the boot id but not their pids) and pid with the process's start
time (``/proc/<pid>/stat``, clock ticks since boot: a reused pid has another). When all
of these name this machine, this boot and this pid namespace, the owner can be checked:
its pid gone, a zombie, or reused by a process started at another time means the owner
is dead, and its lease need not be waited for. Anywhere else (another machine, another
boot, another container, a system without /proc, a record written before these fields
existed) the owner cannot be checked, and only the lease's expiry tells.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PROC = Path("/proc")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def boot_id() -> str | None:
    """This boot's id (Linux), else None."""
    return _read(PROC / "sys" / "kernel" / "random" / "boot_id")


def pid_namespace() -> str | None:
    """This process's pid namespace, e.g. ``pid:[4026531836]`` (Linux), else None."""
    try:
        return os.readlink(PROC / "self" / "ns" / "pid")
    except OSError:
        return None


def start_time(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of process `pid`, or None if
    there is no such process (or no /proc)."""
    text = _read(PROC / str(pid) / "stat")
    if text is None:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; fields after
    # the last ')' start with the state (field 3); the start time is field 22.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


def identity() -> dict:
    """The fields a lease record holds about the process that writes it."""
    pid = os.getpid()
    started = start_time(pid)
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "boot_id": boot_id(),
        "pid_namespace": pid_namespace(),
        "pid_start": started[0] if started else None,
    }


def can_check(record: dict) -> bool:
    """Whether the record's owner process can be checked from here: it names a pid and
    start time on this machine, in this boot and pid namespace."""
    pid, started = record.get("pid"), record.get("pid_start")
    if not (isinstance(pid, int) and pid > 0 and isinstance(started, int)):
        return False
    here = identity()
    if here["boot_id"] is None or here["pid_namespace"] is None:
        return False
    return all(record.get(name) == here[name] for name in ("host", "boot_id", "pid_namespace"))


def owner_is_gone(record: dict) -> bool:
    """True only when the record's owner process provably no longer runs: it ran on this
    machine, in this boot and pid namespace, and its pid is gone, a zombie, or another
    process's. False when it runs, or when that cannot be told."""
    if not can_check(record):
        return False
    pid, started = record["pid"], record["pid_start"]
    found = start_time(pid)
    if found is None:
        return PROC.joinpath("self", "stat").exists()  # no such process (if /proc works)
    ticks, state = found
    return ticks != started or state in ("Z", "X")
