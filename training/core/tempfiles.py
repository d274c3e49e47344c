"""Temporary names: how a writer marks the files it has not published yet, and who cleans
them up.

A local file is written as ``.NAME.tmp-HOST-PID-START-RANDOM`` beside its final name and
renamed into place (see ``storage.open_write``). The name carries its writer, a holder in
``process``'s sense (host, pid and the process's start time), so the writer's temporary
files are never touched while it lives, and :func:`clean_temp` removes them once it is gone
(a reused pid included). Listings never show temporary names.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid

from .process import is_dead, proc_start

TEMP_MARK = ".tmp-"


def owner_tag() -> str:
    """HOST-PID-START of this process."""
    return f"{socket.gethostname()}-{os.getpid()}-{proc_start()}"


def temp_name_for(path: str) -> str:
    """``.NAME.tmp-HOST-PID-START-RANDOM`` beside ``path``: unique to this writer."""
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}{TEMP_MARK}{owner_tag()}-{uuid.uuid4().hex[:12]}")


def is_temp_name(name: str) -> bool:
    return TEMP_MARK in os.path.basename(name.rstrip("/"))


def temp_owner(name: str) -> dict[str, object] | None:
    """The writer of a temporary name as a holder record (host, pid and, for names made
    since start times were recorded, proc_start); None for a name without an owner."""
    tail = os.path.basename(name).split(TEMP_MARK, 1)[-1]
    parts = tail.rsplit("-", 3)
    if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
        return {"host": parts[0], "pid": int(parts[1]), "proc_start": int(parts[2])}
    parts = tail.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return {"host": parts[0], "pid": int(parts[1])}
    return None


def clean_temp(prefix: str, older_than_s: float = 6 * 3600) -> int:
    """Remove leftover local temporary files under ``prefix`` whose writer is gone: a dead
    process of this host (``process.is_dead``: also a pid reused by a later process), or
    (another host, or a name without an owner) older than ``older_than_s``. A live writer's
    temporary file is never touched. An ``s3://`` prefix has none (uploads are invisible
    until complete): nothing to do."""
    if not os.path.isdir(prefix):
        return 0
    host = socket.gethostname()
    now = time.time()
    n = 0
    for root, _dirs, files in os.walk(prefix):
        for name in files:
            if TEMP_MARK not in name:
                continue
            path = os.path.join(root, name)
            owner = temp_owner(name)
            if owner and owner["host"] == host:
                gone = is_dead(owner)
            else:
                try:
                    gone = now - os.path.getmtime(path) > older_than_s
                except FileNotFoundError:
                    continue
            if gone:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    n += 1
    return n
