"""Who is working where, and whether it still is: the one liveness rule of the system.

A *holder* is one process: host, pid and the process's start time (so a reused pid is not
mistaken for the holder). A holder is **dead** when it ran on this host and that process is
gone (or the pid now belongs to a later process), and **silent** when its heartbeat is older
than ``stale_after_s`` (any host: a crashed machine cannot say so). Leases, shard claims and
the owners of temporary files are all judged by :func:`liveness` and :func:`is_dead`.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

HEARTBEAT_S = float(os.environ.get("MOFI_HEARTBEAT_S", "15"))
STALE_AFTER_S = float(os.environ.get("MOFI_STALE_AFTER_S", "300"))


def proc_start(pid: int | str = "self") -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def die_with_parent() -> None:
    """In a child process (or before exec): be killed when the parent dies, so a killed driver
    never leaves its workers running on, writing into its output (Linux's PR_SET_PDEATHSIG).
    A parent that died before this call left the child to init: it exits at once."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(1)


def whoami() -> dict[str, Any]:
    """This process as a holder record."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": proc_start()}


def is_dead(rec: dict[str, Any]) -> bool:
    """True when ``rec``'s process ran on this host and is gone (or its pid was reused)."""
    if rec.get("host") != socket.gethostname() or not rec.get("pid"):
        return False
    pid = int(rec["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    start = rec.get("proc_start")
    return bool(start) and proc_start(pid) not in (0, start)


def is_silent(rec: dict[str, Any], now: float | None = None, stale_after_s: float = STALE_AFTER_S):
    """True when the last heartbeat (or the start, before the first one) is too old."""
    now = time.time() if now is None else now
    beat = rec.get("heartbeat_at") or rec.get("started_at") or 0
    return now - float(beat) > stale_after_s


def liveness(
    rec: dict[str, Any], now: float | None = None, stale_after_s: float = STALE_AFTER_S
) -> str:
    """``live``, ``dead`` (same host, process gone) or ``silent`` (no heartbeat lately)."""
    if is_dead(rec):
        return "dead"
    if is_silent(rec, now, stale_after_s):
        return "silent"
    return "live"


def describe(rec: dict[str, Any]) -> str:
    since = rec.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    what = f" ({rec['what']})" if rec.get("what") else ""
    return f"{rec.get('host', '?')} pid {rec.get('pid', '?')}{what} since {when}"
