"""Shard progress of runs, read from the markers: what ``mofi status`` prints and dashboards read.

``summarize_run(ROOT)`` finds every stage with markers at any depth under ``ROOT`` (a build
version ``ROOT/v=DATE`` holds ``i2e_run/ner``, ``i2e_run/score``, ..., and ``i2e``), and
summarises each: shards done, failed, running, stale and pending; samples in and out; drops
by reason; throughput and an ETA. What status reports is checked, not trusted:

* a running marker whose process is gone (same host) or whose heartbeat went silent is
  counted as **stale**, not running (``training.core.process.liveness``);
* a done marker whose outputs are missing or have another size than it recorded is counted
  as **invalid**: the stage is not complete, and the next run of the stage redoes the shard.

:class:`MarkerReader` reads markers through a cache keyed by each file's version (local
mtime and size, S3 ETag) and lists S3 prefixes page by page, at most every few seconds, so a
dashboard polling a root with tens of thousands of markers re-reads only what changed.

**Sealed stages** (``runtime.sealing``): a complete stage is read from its one sealed
summary, not from every marker; ``mofi status --verify`` reads every marker and output
again. On S3 the stage roots are found by delimited listings that start after the
digit-named shard files (``MarkerReader.list_children``), so no listing grows with shards.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from training.core import storage
from training.core.done_check import outputs_problem
from training.core.process import describe, liveness
from training.core.tempfiles import is_temp_name

from . import markers, sealing
from .layout import MARKER_STORES

MAX_DEPTH = 6
SKIP_DIRS = {"_embedding_cache", "_work", "tb", "checkpoints", "scorer"}


class MarkerReader:
    """Cached, versioned reads of marker folders (one per process is enough; thread-safe)."""

    def __init__(self, listing_ttl_s: float = 3.0):
        self.listing_ttl_s = listing_ttl_s
        self._lock = threading.Lock()
        self._docs: dict[str, tuple[Any, Any]] = {}  # uri -> (version, parsed json)
        self._s3_lists: dict[str, tuple[float, list[tuple[str, Any, int]]]] = {}

    # -- listings: (uri, version, size)
    def list_dir(self, prefix: str) -> list[tuple[str, Any, int]]:
        if storage.is_s3(prefix):
            return self.list_tree(prefix.rstrip("/") + "/", recursive=False)
        try:
            with os.scandir(prefix) as it:
                out = []
                for e in it:
                    if is_temp_name(e.name) or not e.is_file():
                        continue
                    st = e.stat()
                    out.append((e.path, (st.st_mtime_ns, st.st_size), st.st_size))
                return out
        except FileNotFoundError:
            return []

    def _cached(self, key: str, list_fn: Callable[[], Any]) -> Any:
        """An S3 listing, made at most every ``listing_ttl_s`` seconds."""
        now = time.time()
        with self._lock:
            hit = self._s3_lists.get(key)
            if hit and now - hit[0] < self.listing_ttl_s:
                return hit[1]
        out = list_fn()
        with self._lock:
            self._s3_lists[key] = (now, out)
        return out

    def list_tree(self, prefix: str, recursive: bool = True) -> list[tuple[str, Any, int]]:
        bucket, kp = storage.split_s3(prefix)
        return self._cached(
            f"{prefix}|{recursive}",
            lambda: [
                (f"s3://{bucket}/{o['Key']}", o.get("ETag"), int(o["Size"]))
                for o in storage._s3_list(bucket, kp, recursive, prefix)
                if not is_temp_name(o["Key"])
            ],
        )

    def list_children(self, prefix: str) -> tuple[list[str], list[tuple[str, Any, int]]]:
        """(sub-folder names, files) directly under an S3 folder, leaving out the names that
        begin with a digit: the shard files (``00042.tar``), which can be millions. One
        delimited listing that starts after them (``StartAfter``), cached like ``list_tree``."""
        prefix = prefix.rstrip("/") + "/"
        bucket, kp = storage.split_s3(prefix)

        def listing() -> tuple[list[str], list[tuple[str, Any, int]]]:
            dirs, files = [], []
            pages = (
                storage.s3_client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=bucket, Prefix=kp, Delimiter="/", StartAfter=kp + ":")
            )
            with storage._s3_errors(prefix):
                for page in pages:
                    dirs += [
                        c["Prefix"][len(kp) :].strip("/") for c in page.get("CommonPrefixes", [])
                    ]
                    files += [
                        (f"s3://{bucket}/{o['Key']}", o.get("ETag"), int(o["Size"]))
                        for o in page.get("Contents", [])
                        if not is_temp_name(o["Key"])
                    ]
            return dirs, files

        return self._cached(f"{prefix}|children", listing)

    def walk_s3(self, uri: str) -> list[tuple[str, list[str], list[str]]]:
        """(folder relative to ``uri``, its sub-folders, its file names) of every folder the
        status walk visits, as ``os.walk`` does locally (hidden, ``_`` and bulky folders
        skipped, at most ``MAX_DEPTH`` deep)."""
        out = []
        todo = [("", uri.rstrip("/"), 0)]
        while todo:
            rel, folder, depth = todo.pop()
            dirs, files = self.list_children(folder)
            out.append((rel or ".", dirs, [u.rsplit("/", 1)[-1] for u, _, _ in files]))
            if depth >= MAX_DEPTH:
                continue
            for d in sorted(dirs, reverse=True):
                if not d.startswith((".", "_")) and d not in SKIP_DIRS:
                    todo.append((f"{rel}/{d}".strip("/"), f"{folder}/{d}", depth + 1))
        return sorted(out)

    def read_json(self, uri: str, version: Any) -> Any:
        with self._lock:
            hit = self._docs.get(uri)
        if hit is not None and hit[0] == version:
            return hit[1]
        doc = storage.read_json(uri)
        with self._lock:
            self._docs[uri] = (version, doc)
        return doc

    # -- markers of one stage
    def stage_records(
        self, store: markers.MarkerStore, listing: list[tuple[str, Any, int]] | None = None
    ) -> tuple[dict | None, dict[str, dict]]:
        """(plan, shard -> winning record with its state: ``markers.pick_records``), from
        ``listing`` (the marker folder's) when the caller already made it."""
        plan = None
        listing = self.list_dir(store.dir) if listing is None else listing
        self._forget_missing(store.dir, {u for u, _, _ in listing})
        for uri, version, _ in listing:
            if uri.rsplit("/", 1)[-1] == "_plan.json":
                try:
                    plan = self.read_json(uri, version)
                except (FileNotFoundError, ValueError):
                    pass
        recs = markers.pick_records(
            (uri.rsplit("/", 1)[-1], functools.partial(self.read_json, uri, version))
            for uri, version, _ in listing
        )
        return plan, recs

    def _forget_missing(self, folder: str, present: set[str]) -> None:
        """Drop cached documents of ``folder`` that its latest listing no longer has (a
        long-running dashboard must not grow with the markers that come and go)."""
        prefix = folder.rstrip("/") + "/"
        with self._lock:
            gone = [u for u in self._docs if u.startswith(prefix) and u not in present]
            for u in gone:
                del self._docs[u]

    def find_stage_roots(self, uri: str) -> list[tuple[str, str]]:
        """(where, root) of every folder at any depth under ``uri`` that holds stage markers."""
        if storage.is_s3(uri):
            return [
                (rel, storage.join(uri, rel) if rel != "." else uri)
                for rel, dirs, _ in self.walk_s3(uri)
                if markers.MARKER_DIR in dirs
            ]
        found = []
        base = os.path.abspath(uri)
        for d, dirs, _files in os.walk(base):
            depth = d[len(base) :].count(os.sep)
            if markers.MARKER_DIR in dirs:
                rel = os.path.relpath(d, base)
                found.append((rel, d if rel != "." else uri))
            dirs[:] = [
                x
                for x in sorted(dirs)
                if depth < MAX_DEPTH and not x.startswith((".", "_")) and x not in SKIP_DIRS
            ]
        return found


READER = MarkerReader()


def _verify_done(
    reader: MarkerReader, root: str, recs: dict[str, dict[str, Any]]
) -> dict[str, str]:
    """shard -> problem for done markers whose outputs are not as recorded (one listing per
    output folder; ``done_check.outputs_problem``)."""
    sizes: dict[str, int] = {}
    listed: set[str] = set()
    bad = {}
    for shard, rec in recs.items():
        if rec["state"] != "done":
            continue
        outputs = rec.get("stats", {}).get("outputs", {})
        for folder in {markers.output_uri(root, n).rsplit("/", 1)[0] for n in outputs}:
            if folder not in listed:
                listed.add(folder)
                sizes.update({u: n for u, _, n in reader.list_dir(folder)})
        problem = outputs_problem(root, outputs, sizes, size_of=None)
        if problem:
            bad[shard] = problem
    return bad


def _claim_state(shard: str, rec: dict, now: float, running: dict, stale: dict) -> str:
    """``running`` or ``stale``, noting the claim in the matching dict."""
    alive = liveness(rec, now)
    if alive == "live":
        running[shard] = {k: rec.get(k) for k in ("host", "pid", "started_at", "heartbeat_at")}
        return "running"
    how = "process gone" if alive == "dead" else "no heartbeat"
    stale[shard] = f"{how} ({describe(rec)})"
    return "stale"


def summarize_stage(
    root: str,
    stage: str,
    now: float | None = None,
    reader: MarkerReader | None = None,
    sealed: bool = True,
) -> dict[str, Any]:
    """The stage's summary: its sealed one when it has a valid one, else read from every
    marker (and sealed when complete). ``sealed=False``: every marker, never sealed."""
    now = time.time() if now is None else now
    reader = reader or READER
    store = markers.MarkerStore(root, stage)
    if sealed:
        doc = sealing.read_sealed(store)
        if doc is not None:
            return {**doc, "root": root, "sealed": True}
    listing = reader.list_dir(store.dir)
    s = _summarize_markers(store, now, reader, listing)
    if sealed and sealing.sealable(s):

        def relist() -> set:  # a fresh listing (no cached S3 page), in the same form
            return {(u, v) for u, v, _ in MarkerReader(listing_ttl_s=0).list_dir(store.dir)}

        sealing.seal(store, s, {(u, v) for u, v, _ in listing}, relist)
    return s


def _summarize_markers(
    store: markers.MarkerStore, now: float, reader: MarkerReader, listing=None
) -> dict[str, Any]:
    root, stage = store.root, store.stage
    plan, recs = reader.stage_records(store, listing)
    planned = set(plan["shards"]) if plan else set()
    invalid = _verify_done(reader, root, recs)
    counts: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    n_in = n_out = bytes_out = reused_in = 0
    busy_s = 0.0
    first_start, last_end = None, None
    failed: dict[str, str] = {}
    reused: dict[str, str] = {}  # shard -> the earlier build its outputs were copied from
    stale: dict[str, str] = {}
    running: dict[str, dict[str, Any]] = {}
    for shard, rec in recs.items():
        state = rec["state"]
        if state == "running":
            counts[_claim_state(shard, rec, now, running, stale)] += 1
            continue
        if state == "done" and shard in invalid:
            counts["invalid"] += 1
            continue
        counts[state] += 1
        st = markers.ShardStats.from_dict(rec.get("stats", {}))
        if state == "failed":
            failed[shard] = rec.get("error", "")
            continue
        n_in += st.n_in
        n_out += st.n_out
        bytes_out += st.bytes_out
        drops.update(st.drops)
        if rec.get("reused_from"):  # copied, not computed here: no time of this build
            reused[shard] = rec["reused_from"].get("from", "?")
            reused_in += st.n_in
            continue
        busy_s += st.duration_s
        if st.started_at:
            first_start = st.started_at if first_start is None else min(first_start, st.started_at)
        if st.finished_at:
            last_end = st.finished_at if last_end is None else max(last_end, st.finished_at)
    total = len(planned | set(recs)) if planned else len(recs)
    pending = max(
        0,
        total
        - counts["done"]
        - counts["failed"]
        - counts["running"]
        - counts["stale"]
        - counts["invalid"],
    )
    wall = (
        (last_end - first_start) if (first_start and last_end and last_end > first_start) else 0.0
    )
    computed_in = n_in - reused_in
    rate = computed_in / wall if wall else None
    shards_per_s = (counts["done"] - len(reused)) / wall if wall and counts["done"] > 1 else None
    left = total - counts["done"]
    eta = (
        round(left / shards_per_s, 1) if shards_per_s and left > 0 else (0.0 if not left else None)
    )
    return {
        "root": root,
        "stage": stage,
        "shards_total": total,
        "done": counts["done"],
        "failed": counts["failed"],
        "running": counts["running"],
        "stale_running": counts["stale"],
        "invalid": counts["invalid"],
        "pending": pending,
        "samples_in": n_in,
        "samples_out": n_out,
        "drops": dict(sorted(drops.items(), key=lambda kv: -kv[1])),
        "bytes_out": bytes_out,
        "busy_s": round(busy_s, 3),
        "wall_s": round(wall, 3),
        "samples_per_s": round(rate, 2) if rate else None,
        "samples_per_busy_s": round(computed_in / busy_s, 2) if busy_s else None,
        "eta_s": eta,
        "reused": len(reused),
        "reused_from": dict(Counter(reused.values())),
        "reused_shards": reused,
        "failed_shards": failed,
        "stale_shards": stale,
        "invalid_shards": invalid,
        "running_shards": running,
        "last_update": max(
            [
                float(r.get("heartbeat_at") or r.get("stats", {}).get("finished_at") or 0)
                for r in recs.values()
            ]
            or [0.0]
        ),
        "complete": total > 0 and counts["done"] == total,
    }


def summarize_run(
    run_uri: str, reader: MarkerReader | None = None, sealed: bool = True
) -> list[dict[str, Any]]:
    """Every stage under ``run_uri`` (any depth), in pipeline order (``layout.STAGES``; a
    stage the pipeline does not know, such as the demo's, after them alphabetically).
    ``sealed=False`` reads every marker even of sealed stages (``mofi status --verify``)."""
    reader = reader or READER
    if not storage.is_s3(run_uri) and not os.path.exists(run_uri):
        raise FileNotFoundError(f"run not found: {run_uri}")
    out = []
    now = time.time()
    for label, root in reader.find_stage_roots(run_uri):
        for stage in stages(reader, root):
            s = summarize_stage(root, stage, now, reader, sealed=sealed)
            s["where"] = label
            out.append(s)
    return sorted(out, key=display_order)


_RANK = {name: i for i, name in enumerate(MARKER_STORES)}


def display_order(summary: dict[str, Any]) -> tuple:
    """Sort key of a stage summary: pipeline order (``layout.STAGES``), then a stage the
    pipeline does not know alphabetically, then where it is."""
    return (_RANK.get(summary["stage"], len(_RANK)), summary["stage"], summary["where"])


def stages(reader: MarkerReader, root: str) -> list[str]:
    """The stages with markers under ``root``."""
    base = storage.join(root, markers.MARKER_DIR)
    if storage.is_s3(base):
        return sorted(reader.list_children(base)[0])
    return markers.list_stages(root)


def state_of(s: dict[str, Any]) -> str:
    if s["failed"]:
        return "FAILED"
    if s["invalid"]:
        return "INVALID"
    if s["complete"]:
        return "complete"
    if s["running"]:
        return "running"
    if s["stale_running"]:
        return "stale"
    return "incomplete"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def render(summaries: list[dict[str, Any]], run_uri: str, shards: bool = False) -> str:
    """The status table; ``shards``: also one line per reused shard (where it came from)."""
    if not summaries:
        return f"{run_uri}: no stage markers found (nothing has run here yet)"
    lines = [f"run {run_uri}"]
    header = f"{'stage':<10}{'where':<16}{'done':>6}{'fail':>6}{'run':>5}{'stale':>6}{'pend':>6}  {'in':>9}{'out':>9}  {'rate/s':>8}  {'bytes':>9}  state"
    lines.append(header)
    lines.append("-" * len(header))
    pad = " " * 10
    for s in summaries:
        rate = f"{s['samples_per_s']:.1f}" if s["samples_per_s"] else "-"
        where = s["where"] if len(s["where"]) <= 15 else "…" + s["where"][-14:]
        lines.append(
            f"{s['stage']:<10}{where:<16}{s['done']:>6}{s['failed']:>6}{s['running']:>5}{s['stale_running']:>6}{s['pending']:>6}"
            f"  {s['samples_in']:>9}{s['samples_out']:>9}  {rate:>8}  {_human_bytes(s['bytes_out']):>9}  {state_of(s)}"
        )
        if s["drops"]:
            drops = ", ".join(f"{k}={v}" for k, v in s["drops"].items())
            lines.append(f"{pad}drops: {drops}")
        for label, n in sorted(s.get("reused_from", {}).items()):
            computed = s["done"] - s.get("reused", 0)
            lines.append(f"{pad}{n} shards reused from {label}, {computed} computed here")
        if shards:
            for shard, label in sorted(s.get("reused_shards", {}).items()):
                lines.append(f"{pad}{shard}: reused from {label}")
        for kind, shards in (
            ("failed", s["failed_shards"]),
            ("invalid", s["invalid_shards"]),
            ("stale", s["stale_shards"]),
        ):
            for shard, why in sorted(shards.items())[:5]:
                lines.append(f"{pad}{kind} {shard}: {why[:160]}")
            if len(shards) > 5:
                lines.append(f"{pad}... and {len(shards) - 5} more {kind} shards")
    return "\n".join(lines)


def to_json(run_uri: str, summaries: list[dict[str, Any]]) -> str:
    return json.dumps({"run": run_uri, "stages": summaries}, indent=2, sort_keys=True)
