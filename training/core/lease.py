"""Who is working where: process identity, liveness, and leases with a heartbeat.

A *holder* is one process: host, pid and the process's start time (so a reused pid is not
mistaken for the holder). A holder is **dead** when it ran on this host and that process is
gone, and **silent** when its heartbeat is older than ``stale_after_s`` (any host: a crashed
machine cannot say so). A dead or silent holder keeps nothing.

:class:`Lease` makes one writer per resource (a stage of an output root, a training run's
``--out``): ``acquire`` publishes ``LEASE.json`` only where none is held by a live holder
(local files: an exclusive create; S3: a conditional PUT), a daemon thread refreshes its
heartbeat, ``release`` deletes it. A second process waits up to ``wait_s`` and then
refuses with a message naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from . import storage

log = logging.getLogger(__name__)

HEARTBEAT_S = float(os.environ.get("MOFI_HEARTBEAT_S", "15"))
STALE_AFTER_S = float(os.environ.get("MOFI_STALE_AFTER_S", "300"))


class LeaseHeld(RuntimeError):
    """Another live process holds the lease."""


def _proc_start(pid: int | str = "self") -> int:
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
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start()}


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
    return bool(start) and _proc_start(pid) not in (0, start)


def is_silent(rec: dict[str, Any], now: float | None = None, stale_after_s: float = STALE_AFTER_S):
    """True when the last heartbeat (or the start, before the first one) is too old."""
    now = time.time() if now is None else now
    beat = rec.get("heartbeat_at") or rec.get("started_at") or 0
    return now - float(beat) > stale_after_s


def liveness(rec: dict[str, Any], now: float | None = None) -> str:
    """``live``, ``dead`` (same host, process gone) or ``silent`` (no heartbeat lately)."""
    if is_dead(rec):
        return "dead"
    if is_silent(rec, now):
        return "silent"
    return "live"


def describe(rec: dict[str, Any]) -> str:
    since = rec.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    what = f" ({rec['what']})" if rec.get("what") else ""
    return f"{rec.get('host', '?')} pid {rec.get('pid', '?')}{what} since {when}"


class Lease:
    """One holder at a time for ``uri`` (a JSON file); see the module doc."""

    def __init__(self, uri: str, what: str = "", stale_after_s: float = STALE_AFTER_S):
        self.uri = uri
        self.what = what
        self.stale_after_s = stale_after_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            **whoami(),
            "token": self.token,
            "what": self.what,
            "started_at": getattr(self, "_started", now),
            "heartbeat_at": now,
        }

    def read(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.uri)
        except (FileNotFoundError, ValueError):
            return None

    def _expired(self, rec: dict[str, Any]) -> bool:
        return is_dead(rec) or is_silent(rec, stale_after_s=self.stale_after_s)

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> Lease:
        deadline = time.time() + wait_s
        self._started = time.time()
        while True:
            if storage.create_exclusive(self.uri, json.dumps(self._record()).encode()):
                break
            rec = self.read()
            if rec is None:
                continue  # released between our create and our read: try again
            if self._expired(rec):
                log.warning(
                    "taking over the lease %s from %s (%s)",
                    self.uri,
                    describe(rec),
                    "dead" if is_dead(rec) else "silent",
                )
                if storage.replace_if_unchanged(self.uri, rec, json.dumps(self._record()).encode()):
                    break
                continue
            if time.time() >= deadline:
                raise LeaseHeld(
                    f"{self.uri} is held by {describe(rec)}: another run is writing there; "
                    "wait for it, stop it, or use another output"
                )
            time.sleep(poll_s)
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="mofi-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            rec = self.read()
            if rec is None or rec.get("token") != self.token:
                log.error("lost the lease %s (now %s)", self.uri, rec and describe(rec))
                self.held = False
                return
            with contextlib.suppress(Exception):
                storage.write_json(self.uri, self._record(), indent=None)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            rec = self.read()
            if rec is not None and rec.get("token") == self.token:
                with contextlib.suppress(Exception):
                    storage.delete(self.uri)
        self.held = False

    def __enter__(self) -> Lease:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()
