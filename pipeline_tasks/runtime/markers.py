"""Per-shard bookkeeping: plan, running, done and failed markers with stats.

Layout under a stage's output root::

    ROOT/_markers/STAGE/_plan.json            shard ids the stage will process
    ROOT/_markers/STAGE/SHARD.running.json    written when a worker starts a shard
    ROOT/_markers/STAGE/SHARD.done.json       written last, after the shard's outputs are published
    ROOT/_markers/STAGE/SHARD.failed.json     the error, when processing raised

A stage skips shards whose done marker exists, so any task can be retried. The done
marker is written after the outputs are published, so a shard that has its marker is
complete; a shard without it is rewritten from scratch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import traceback
from collections import Counter
from collections.abc import Iterable
from typing import Any

from training.core import storage

MARKER_DIR = "_markers"
STATES = ("done", "failed", "running")
log = logging.getLogger(__name__)


@dataclasses.dataclass
class ShardStats:
    """What one shard of one stage did. Saved in its marker, summed by ``mofi status``."""

    n_in: int = 0
    n_out: int = 0
    drops: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes_out: int = 0
    duration_s: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    host: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardStats:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class DropLogger:
    """Counts skipped records per reason and logs the first few of each reason only."""

    def __init__(
        self, stats: ShardStats, logger: logging.Logger | None = None, per_reason: int = 3
    ):
        self.stats = stats
        self.logger = logger or log
        self.per_reason = per_reason
        self._seen: Counter[str] = Counter()

    def __call__(self, reason: str, detail: str = "") -> None:
        self.stats.drop(reason)
        self._seen[reason] += 1
        if self._seen[reason] <= self.per_reason:
            more = " (further ones only counted)" if self._seen[reason] == self.per_reason else ""
            self.logger.warning("skip [%s] %s%s", reason, detail, more)


def shard_id(index: int) -> str:
    return f"{index:05d}"


class MarkerStore:
    """Markers of one stage under one output root."""

    def __init__(self, root: str, stage: str):
        if not stage or "/" in stage:
            raise ValueError(f"bad stage name {stage!r}")
        self.root = root
        self.stage = stage
        self.dir = storage.join(root, MARKER_DIR, stage)

    def _uri(self, shard: str, state: str) -> str:
        return storage.join(self.dir, f"{shard}.{state}.json")

    # -- plan
    def write_plan(self, shards: Iterable[str], meta: dict[str, Any] | None = None) -> None:
        storage.write_json(
            storage.join(self.dir, "_plan.json"),
            {
                "stage": self.stage,
                "shards": sorted(shards),
                "created_at": time.time(),
                **(meta or {}),
            },
        )

    def read_plan(self) -> dict[str, Any] | None:
        uri = storage.join(self.dir, "_plan.json")
        return storage.read_json(uri) if storage.exists(uri) else None

    # -- state
    def is_done(self, shard: str) -> bool:
        return storage.exists(self._uri(shard, "done"))

    def read_done(self, shard: str) -> ShardStats | None:
        uri = self._uri(shard, "done")
        if not storage.exists(uri):
            return None
        return ShardStats.from_dict(storage.read_json(uri)["stats"])

    def mark_running(self, shard: str) -> None:
        storage.write_json(
            self._uri(shard, "running"),
            {
                "shard": shard,
                "started_at": time.time(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            },
        )

    def mark_done(self, shard: str, stats: ShardStats) -> None:
        storage.write_json(
            self._uri(shard, "done"), {"shard": shard, "state": "done", "stats": stats.to_dict()}
        )
        storage.delete(self._uri(shard, "running"))
        storage.delete(self._uri(shard, "failed"))

    def mark_failed(self, shard: str, error: str, stats: ShardStats) -> None:
        storage.write_json(
            self._uri(shard, "failed"),
            {"shard": shard, "state": "failed", "error": error, "stats": stats.to_dict()},
        )
        storage.delete(self._uri(shard, "running"))

    def read_all(self) -> dict[str, dict[str, Any]]:
        """shard -> marker record with its ``state``; done beats failed beats running."""
        rank = {"done": 0, "failed": 1, "running": 2}
        out: dict[str, dict[str, Any]] = {}
        for uri in storage.list_files(self.dir, suffix=".json"):
            name = storage.basename(uri)
            if name.startswith("_"):
                continue
            parts = name[: -len(".json")].rsplit(".", 1)
            if len(parts) != 2 or parts[1] not in STATES:
                continue
            shard, state = parts
            if shard in out and rank[out[shard]["state"]] <= rank[state]:
                continue
            try:
                rec = storage.read_json(uri)
            except (ValueError, FileNotFoundError):  # vanished or torn by a concurrent writer
                continue
            rec["state"] = state
            out[shard] = rec
        return out


class ShardRun:
    """Context manager around processing one shard: running marker, timing, done/failed marker.

    ``with ShardRun(store, "00003") as run: ...; run.stats.n_out += 1`` writes the done marker
    on a clean exit and the failed marker (then re-raises) on an exception. Call it only after
    the shard's outputs were published inside the block.
    """

    def __init__(self, store: MarkerStore, shard: str):
        self.store = store
        self.shard = shard
        self.stats = ShardStats(host=socket.gethostname())
        self._t0 = 0.0

    def __enter__(self) -> ShardRun:
        self._t0 = time.perf_counter()
        self.stats.started_at = time.time()
        self.store.mark_running(self.shard)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stats.duration_s = round(time.perf_counter() - self._t0, 4)
        self.stats.finished_at = time.time()
        if exc is None:
            self.store.mark_done(self.shard, self.stats)
        elif isinstance(exc, Exception):
            err = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            self.store.mark_failed(self.shard, err, self.stats)
        else:  # KeyboardInterrupt etc.: leave the running marker, it is stale-checked by status
            pass
        return False


def list_stages(root: str) -> list[str]:
    """Stages that have markers under ``root``."""
    base = storage.join(root, MARKER_DIR)
    if storage.is_s3(base):
        stages = set()
        for uri in storage.list_files(base, suffix=".json", recursive=True):
            rel = uri[len(base) + 1 :]
            if "/" in rel:
                stages.add(rel.split("/", 1)[0])
        return sorted(stages)
    if not os.path.isdir(base):
        return []
    return sorted(
        d
        for d in os.listdir(base)
        if os.path.isdir(os.path.join(base, d)) and not d.startswith(".")
    )
