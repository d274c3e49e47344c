"""Per-shard bookkeeping: plan, running, done and failed markers with stats.

Layout under a stage's output root::

    ROOT/_markers/STAGE/_plan.json            shard ids the stage will process
    ROOT/_markers/STAGE/SHARD.running.json    the shard's claim: host, pid, heartbeat
    ROOT/_markers/STAGE/SHARD.done.json       written last, after the shard's outputs are published
    ROOT/_markers/STAGE/SHARD.failed.json     the error, when processing raised or its worker died
    ROOT/_markers/STAGE/_summary.json         the sealed summary of a complete stage (status)

* **A running marker is a claim.** It is created exclusively (:meth:`MarkerStore.claim`), so
  two runs on one root never work on the same shard; a daemon thread refreshes its
  heartbeat while the shard is in flight. A claim whose process is gone (same host) or whose
  heartbeat went silent is *stale*: status shows it so, and the next claim takes it over.
* **A done marker vouches for its outputs**: their names, sizes and sha256 (``stats.outputs``).
  :meth:`MarkerStore.verify` checks them cheaply (existence and size; ``deep`` also the hash),
  and a stage redoes a shard whose done marker no longer matches what is on storage.
* **A failure always leaves a failed marker**; a later success removes it.
* **A complete stage is sealed** (``runtime.sealing``); a new plan, a claim or a withdrawn
  done marker deletes its summary.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from pipeline_tasks.runtime.heartbeats import HEARTBEATS
from training.core import storage
from training.core.done_check import MARKER_DIR, marker_uri, output_uri, outputs_problem
from training.core.exclusive import create_exclusive, replace_if_unchanged
from training.core.process import describe, liveness, whoami

STATES = ("done", "failed", "running")
SUMMARY_NAME = "_summary.json"
# which marker of a shard wins when several exist (a write between listing and reading)
PRECEDENCE = {"done": 0, "failed": 1, "running": 2}
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
    # published file (relative to the store's root) -> {"size": bytes, "sha256": hex}
    outputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardStats:
        return cls(**{k: v for k, v in d.items() if k in _STATS_FIELDS})


_STATS_FIELDS = frozenset(f.name for f in dataclasses.fields(ShardStats))


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


# The one shard of a stage that runs as a whole (kb, vocab, the demo's pictures).
WHOLE_STAGE = shard_id(0)


def relative_name(root: str, uri: str) -> str:
    """``uri`` relative to ``root`` when below it, else ``uri`` itself."""
    root = root.rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else uri


def record_outputs(stats: ShardStats, root: str, uris: Iterable[str]) -> None:
    """Note each published file's size and sha256 in ``stats`` (what the done marker vouches
    for); ``bytes_out`` becomes their total."""
    for uri in uris:
        stats.outputs[relative_name(root, uri)] = {
            "size": storage.size(uri),
            "sha256": storage.sha256(uri),
        }
    stats.bytes_out = sum(o["size"] for o in stats.outputs.values())


class MarkerStore:
    """Markers of one stage under one output root."""

    def __init__(self, root: str, stage: str, keys: dict[str, dict[str, Any]] | None = None):
        if not stage or "/" in stage:
            raise ValueError(f"bad stage name {stage!r}")
        self.root = root
        self.stage = stage
        self.dir = storage.join(root, MARKER_DIR, stage)
        # shard -> reuse key (``runtime.reuse``): written into each done marker, and a done
        # marker with another key is out of date (its shard is redone)
        self.keys: dict[str, dict[str, Any]] = dict(keys or {})

    def _uri(self, shard: str, state: str) -> str:
        return marker_uri(self.root, self.stage, shard, state)

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
        self.drop_summary()

    def read_plan(self) -> dict[str, Any] | None:
        uri = storage.join(self.dir, "_plan.json")
        return storage.read_json(uri) if storage.exists(uri) else None

    @property
    def summary_uri(self) -> str:
        """The sealed summary of the complete stage (``runtime.sealing``)."""
        return storage.join(self.dir, SUMMARY_NAME)

    def drop_summary(self) -> None:
        """A marker changed after it: the sealed summary no longer holds. Called after the
        change, so a summary sealed from the markers before it cannot outlive it."""
        storage.delete(self.summary_uri)

    @property
    def lease_uri(self) -> str:
        return storage.join(self.dir, "_lease.json")

    # -- state
    def is_done(self, shard: str) -> bool:
        return storage.exists(self._uri(shard, "done"))

    def read_done(self, shard: str) -> ShardStats | None:
        uri = self._uri(shard, "done")
        if not storage.exists(uri):
            return None
        return ShardStats.from_dict(storage.read_json(uri)["stats"])

    def _running_record(self, shard: str) -> dict[str, Any]:
        now = time.time()
        return {
            "shard": shard,
            "started_at": now,
            "heartbeat_at": now,
            "token": f"{whoami()['host']}-{whoami()['pid']}-{now}",
            **whoami(),
        }

    def claim(self, shard: str) -> dict[str, Any] | None:
        """Claim ``shard`` for this process: None when done, else the claim made, or raise
        :class:`ShardBusy` naming the live holder."""
        import json

        uri = self._uri(shard, "running")
        rec = self._running_record(shard)
        data = json.dumps(rec).encode()
        while not create_exclusive(uri, data):
            try:
                held = storage.read_json(uri)
            except (FileNotFoundError, ValueError):
                continue
            if liveness(held) == "live":
                raise ShardBusy(
                    f"{self.stage} shard {shard} is being processed by {describe(held)}"
                )
            if replace_if_unchanged(uri, held, data):
                log.warning(
                    "%s shard %s: took over the stale claim of %s",
                    self.stage,
                    shard,
                    describe(held),
                )
                break
        HEARTBEATS.add(uri, rec)
        self.drop_summary()
        return rec

    def mark_running(self, shard: str) -> None:
        """Claim ``shard``, taking over any claim (a stage that already owns its shards)."""
        uri = self._uri(shard, "running")
        rec = self._running_record(shard)
        storage.write_json(uri, rec, indent=None)
        HEARTBEATS.add(uri, rec)
        self.drop_summary()

    def release(self, shard: str) -> None:
        uri = self._uri(shard, "running")
        HEARTBEATS.remove(uri)
        storage.delete(uri)

    def mark_done(
        self, shard: str, stats: ShardStats, reused_from: dict[str, Any] | None = None
    ) -> None:
        """The done marker names its one writer: the process and the token of the claim it
        held (from when to when), so exactly-once work can be shown from the markers. It
        holds the shard's reuse key when the store has one, and ``reused_from`` when its
        outputs were copied from an earlier version (``runtime.reuse``)."""
        claim = HEARTBEATS.record(self._uri(shard, "running")) or self._running_record(shard)
        writer = {k: claim.get(k) for k in ("host", "pid", "proc_start", "token")}
        writer.update(claimed_at=claim.get("started_at"), done_at=time.time())
        doc = {"shard": shard, "state": "done", "stats": stats.to_dict(), "writer": writer}
        if shard in self.keys:
            doc["key"] = self.keys[shard]
        if reused_from:
            doc["reused_from"] = reused_from
        storage.write_json(self._uri(shard, "done"), doc)
        storage.delete(self._uri(shard, "failed"))
        self.release(shard)

    def mark_failed(self, shard: str, error: str, stats: ShardStats) -> None:
        storage.write_json(
            self._uri(shard, "failed"),
            {"shard": shard, "state": "failed", "error": error, "stats": stats.to_dict()},
        )
        self.release(shard)

    def unmark_done(self, shard: str) -> None:
        """Withdraw a done marker whose outputs no longer match (the shard is redone)."""
        storage.delete(self._uri(shard, "done"))
        self.drop_summary()

    # -- verification
    def verify(
        self,
        shard: str,
        stats: ShardStats | None = None,
        sizes: dict[str, int] | None = None,
        deep: bool = False,
    ) -> str | None:
        """None if the done marker's outputs are on storage as it recorded them, else what is
        wrong. ``sizes``: URI -> size from one listing (cheap for many shards)."""
        stats = stats if stats is not None else self.read_done(shard)
        if stats is None:
            return "no done marker"
        return outputs_problem(self.root, stats.outputs, sizes, deep=deep)

    def is_complete(self, shard: str) -> bool:
        """Done, and its outputs are as the done marker recorded them."""
        stats = self.read_done(shard)
        return stats is not None and self.verify(shard, stats) is None

    def read_all(self) -> dict[str, dict[str, Any]]:
        """shard -> marker record with its ``state`` (:func:`pick_records`)."""
        return pick_records(
            (storage.basename(u), functools.partial(storage.read_json, u))
            for u in storage.list_files(self.dir, suffix=".json")
        )


def pick_records(
    markers: Iterable[tuple[str, Callable[[], dict[str, Any]]]],
) -> dict[str, dict[str, Any]]:
    """shard -> its winning marker record with its ``state``, from (file name, reader) pairs:
    done beats failed beats running (:data:`PRECEDENCE`); a marker that vanished or was torn
    by a concurrent writer while being read is passed over; other names are ignored."""
    out: dict[str, dict[str, Any]] = {}
    for name, read in markers:
        parsed = parse_marker_name(name)
        if parsed is None:
            continue
        shard, state = parsed
        if shard in out and PRECEDENCE[out[shard]["state"]] <= PRECEDENCE[state]:
            continue
        try:
            rec = dict(read())
        except (ValueError, FileNotFoundError):
            continue
        rec["state"] = state
        out[shard] = rec
    return out


def verify_done(
    store: MarkerStore, shards: Iterable[str], deep: bool = False
) -> dict[str, str | None]:
    """shard -> None when complete, else what is wrong ("no done marker", "X is missing", ...).
    One listing of the markers and one per output folder, however many shards."""
    done = {
        parse_marker_name(storage.basename(u))[0]
        for u in storage.list_files(store.dir, suffix=".done.json")
        if parse_marker_name(storage.basename(u))
    }
    stats: dict[str, ShardStats] = {}
    out: dict[str, str | None] = {}
    for shard in shards:
        if shard not in done:
            out[shard] = "no done marker"
            continue
        try:
            doc = storage.read_json(store._uri(shard, "done"))
            stats[shard] = ShardStats.from_dict(doc["stats"])
        except (FileNotFoundError, ValueError, KeyError):
            out[shard] = "no done marker"
            continue
        old, new = (doc.get("key") or {}).get("key"), store.keys.get(shard, {}).get("key")
        if old and new and old != new:  # (a marker from before keys existed is kept)
            out[shard] = f"its inputs changed ({_key_change(doc['key'], store.keys[shard])})"
            del stats[shard]
    folders = {
        output_uri(store.root, n).rsplit("/", 1)[0] for st in stats.values() for n in st.outputs
    }
    sizes: dict[str, int] = {}
    for folder in folders:
        sizes.update(storage.list_sizes(folder))
    for shard, st in stats.items():
        out[shard] = store.verify(shard, st, sizes, deep)
    return out


def _key_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which parts of a reuse key differ, e.g. ``raw_parquet, kb``."""
    a, b = old.get("parts", {}), new.get("parts", {})
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))) or "key"


def completed_shards(store: MarkerStore, producer: str) -> list[str]:
    """The planned shards of an upstream stage, all complete (its done markers match their
    files): what the next stage reads. Raises FileNotFoundError naming the missing stage or
    the pending shards and the command that makes them (``mofi PRODUCER``)."""
    plan = store.read_plan()
    if not plan:
        raise FileNotFoundError(
            f"no {store.stage} stage under {store.root}: run `mofi {producer}` first"
        )
    checked = verify_done(store, plan["shards"])
    pending = {s: p for s, p in checked.items() if p is not None}
    if pending:
        raise FileNotFoundError(
            f"{store.stage} is not finished ({len(pending)} of {len(plan['shards'])} shards "
            f"pending, e.g. {dict(list(pending.items())[:3])}): run `mofi {producer}` first "
            "(it resumes where it stopped)"
        )
    return list(plan["shards"])


class ShardBusy(RuntimeError):
    """Another live process holds the shard's claim."""


def parse_marker_name(name: str) -> tuple[str, str] | None:
    """``00003.done.json`` -> ("00003", "done"); None for the plan, the lease and others."""
    if name.startswith("_") or not name.endswith(".json"):
        return None
    parts = name[: -len(".json")].rsplit(".", 1)
    if len(parts) != 2 or parts[1] not in STATES:
        return None
    return parts[0], parts[1]


class ShardRun:
    """Context manager around processing one shard: claim, timing, done/failed marker.

    ``with ShardRun(store, "00003") as run: ...; run.stats.n_out += 1`` writes the done marker
    on a clean exit and the failed marker (then re-raises) on an exception. Call it only after
    the shard's outputs were published inside the block. ``claim=True`` claims the shard
    exclusively first (raising :class:`ShardBusy` when a live process holds it).
    """

    def __init__(self, store: MarkerStore, shard: str, claim: bool = False):
        self.store = store
        self.shard = shard
        self.claim = claim
        self.stats = ShardStats(host=whoami()["host"])
        self._t0 = 0.0

    def __enter__(self) -> ShardRun:
        if self.claim:
            self.store.claim(self.shard)
        else:
            self.store.mark_running(self.shard)
        self._t0 = time.perf_counter()
        self.stats.started_at = time.time()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stats.duration_s = round(time.perf_counter() - self._t0, 4)
        self.stats.finished_at = time.time()
        if exc is None:
            self.store.mark_done(self.shard, self.stats)
        elif isinstance(exc, Exception):
            err = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            self.store.mark_failed(self.shard, err, self.stats)
        else:  # KeyboardInterrupt etc.: the claim stays; its process will be gone (stale)
            HEARTBEATS.remove(self.store._uri(self.shard, "running"))
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
    import os

    if not os.path.isdir(base):
        return []
    return sorted(
        d
        for d in os.listdir(base)
        if os.path.isdir(os.path.join(base, d)) and not d.startswith(".")
    )
