"""Failpoints: named places where a test stops a real run in the state it wants to break
(the practice of fail-rs and FoundationDB's simulation), so a kill lands mid-shard every time
instead of wherever a timer happens to fall.

Off unless ``MOFI_FAILPOINTS`` is set (one environment lookup per hit): ``NAME:MATCH=ACTION``
entries separated by ``;``, where ``MATCH`` is a substring of the subject (a URI) and
``ACTION`` is ``pause`` (sleep until killed), ``crash`` (exit at once, status 137, as a
SIGKILL would) or ``wait:PATH`` (go on once PATH exists: a test holds two processes in
the state it wants at the same time, then lets them go). Named points:

* ``publish``: in :func:`training.core.storage.open_write`, the whole file written under its
  temporary name, not yet published (its claim held, its temp output on storage).
"""

from __future__ import annotations

import os
import sys
import time

ENV = "MOFI_FAILPOINTS"


def _entries(spec: str) -> list[tuple[str, str, str]]:
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        where, _, action = entry.partition("=")
        name, _, match = where.partition(":")
        if not (action in ("pause", "crash") or action.startswith("wait:")) or not name:
            raise ValueError(f"{ENV}: bad entry {entry!r} (NAME:MATCH=pause|crash|wait:PATH)")
        out.append((name, match, action))
    return out


def hit(name: str, subject: str = "") -> None:
    """Act if ``MOFI_FAILPOINTS`` names this point for ``subject``; else nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for point, match, action in _entries(spec):
        if point == name and match in subject:
            print(f"failpoint {name} at {subject}: {action} (pid {os.getpid()})",
                  file=sys.stderr, flush=True)  # fmt: skip
            if action == "crash":
                os._exit(137)
            while not (action.startswith("wait:") and os.path.exists(action[5:])):
                time.sleep(0.05)
