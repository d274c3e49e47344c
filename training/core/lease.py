"""Leases with a heartbeat: one writer per resource.

A holder (``process``: host, pid, start time) that is dead or silent keeps nothing.

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
import threading
import time
import uuid
from typing import Any

from . import storage
from .exclusive import create_exclusive, replace_if_unchanged
from .process import HEARTBEAT_S, STALE_AFTER_S, describe, is_dead, liveness, whoami

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live process holds the lease."""


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
        return liveness(rec, stale_after_s=self.stale_after_s) != "live"

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> Lease:
        deadline = time.time() + wait_s
        self._started = time.time()
        while True:
            if create_exclusive(self.uri, json.dumps(self._record()).encode()):
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
                if replace_if_unchanged(self.uri, rec, json.dumps(self._record()).encode()):
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
