"""The heartbeat of a process's claims: one daemon thread refreshing the running marker of
every shard the process holds (``markers.MarkerStore.claim``), so that other workers see the
claim alive and a dead worker's claim goes stale."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from training.core import storage
from training.core.process import HEARTBEAT_S

log = logging.getLogger(__name__)


class _Heartbeats:
    """One daemon thread per process refreshing the running markers of its shards in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, dict[str, Any]] = {}  # marker uri -> record
        self._thread: threading.Thread | None = None

    def add(self, uri: str, rec: dict[str, Any]) -> None:
        with self._lock:
            self._live[uri] = rec
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="mofi-heartbeat", daemon=True
                )
                self._thread.start()

    def remove(self, uri: str) -> None:
        with self._lock:
            self._live.pop(uri, None)

    def drop_all(self) -> None:
        """Stop beating for every claim, as this process's death would."""
        with self._lock:
            self._live.clear()

    def record(self, uri: str) -> dict[str, Any] | None:
        """This process's claim record for ``uri`` (None when it holds none)."""
        with self._lock:
            rec = self._live.get(uri)
            return dict(rec) if rec else None

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                items = list(self._live.items())
            for uri, rec in items:
                rec["heartbeat_at"] = time.time()
                try:
                    current = storage.read_json(uri)
                except FileNotFoundError:  # finished (maybe by another process of the job)
                    self.remove(uri)
                    continue
                except Exception as exc:  # a missed beat is not fatal; silence is reported
                    log.debug("heartbeat %s: %s", uri, exc)
                    continue
                if current.get("token") != rec["token"]:
                    self.remove(uri)  # taken over: not ours any more
                    continue
                try:
                    storage.write_json(uri, rec, indent=None)
                except Exception as exc:
                    log.debug("heartbeat %s: %s", uri, exc)


HEARTBEATS = _Heartbeats()
