"""Incremental rebuilds: a per-shard stage takes an earlier version's output of a shard when
nothing that output depends on has changed.

* **The key.** A per-shard stage (ner, score) computes for every planned shard a *reuse key*:
  the sha256 of what its output depends on (:func:`make_key`). ner: the raw Parquet's
  content, the knowledge base's content, the ner config's output fingerprint and the stage's
  code version. score: the raw tar's content, the sha256 of the shard's ner output (which
  covers its Parquet, the KB and ner's config), the KB's content (entity texts), the score
  config's output fingerprint, the scorer's fingerprint (its weights) and the code version.
  The driver sets the keys on its :class:`~.markers.MarkerStore`; every done marker then
  records ``key: {"key": HEX, "parts": {...}}``, so what a shard was made from can be read
  back and compared (``mofi status --shards`` shows it).
* **Invalidation.** A done marker whose key differs from the shard's key now is withdrawn
  and the shard redone, in the same version too (``executor.pending_tasks``): a raw shard
  re-crawled under the same name, a new KB, a changed config or another scorer each redo
  exactly the shards whose key they enter.
* **Adoption** (:func:`adopt`). A pending shard whose key equals the key of a complete done
  shard of the *source* (an earlier version's run) is claimed, its outputs are copied into
  this version, and its done marker says ``reused_from`` (version, run, shard). Copies, not
  references: a version stays self-contained (deleting or re-running an older version never
  breaks a newer one, and every reader keeps reading its own folder). The copy costs no
  bytes: a hard link on local storage (every publish renames a new file into place, never
  writes into a published one, so the shared inode cannot change under either version) and
  a server-side ``CopyObject`` on S3 (no data through this process; ``storage.copy``).

Global stages (vocab, write) read every shard and run over the whole new version as before.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from training.core import storage
from training.core.config import ConfigError
from training.core.done_check import output_uri, outputs_problem

from .executor import ShardTask, StageResult
from .layout import I2E_DIR_NAME, RUN_DIR_NAME, VERSION_PREFIX, RunLayout, sibling
from .markers import MarkerStore, ShardBusy, ShardStats

log = logging.getLogger(__name__)

# Bump a stage's number when its code changes what it writes for the same inputs: every
# earlier output of that stage then stops matching, and the next rebuild redoes it.
CODE_VERSIONS = {"ner": 1, "score": 1}
NONE = "none"  # reuse_from value: a full rebuild
COPY_THREADS = 16  # concurrent copies (server-side on S3: request latency, not bandwidth)


def make_key(stage: str, parts: dict[str, Any]) -> dict[str, Any]:
    """``{"key": HEX, "parts": parts}``: the hash of the stage, its code version and
    ``parts`` (what one shard's output depends on)."""
    doc = {"stage": stage, "code": CODE_VERSIONS[stage], **parts}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
    return {"key": digest, "parts": {"code": CODE_VERSIONS[stage], **parts}}


def content_ids(uris: Iterable[str], threads: int = 8) -> dict[str, str]:
    """URI -> ``storage.content_id`` (sha256 locally, ETag on S3), computed concurrently."""
    uris = list(dict.fromkeys(uris))
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(uris) or 1))) as pool:
        return dict(zip(uris, pool.map(storage.content_id, uris), strict=True))


@dataclasses.dataclass(frozen=True)
class ReuseSource:
    """The earlier build a rebuild takes unchanged shards from."""

    run: RunLayout
    label: str  # how status names it: ``v=VERSION``, or the run root

    def store(self, stage: str) -> MarkerStore:
        return self.run.store(stage)


def resolve_source(uri: str | None) -> ReuseSource | None:
    """The earlier build at ``uri``: a version root (``ROOT/v=X``), its ``i2e`` or its
    ``i2e_run``, or any build's run root (``mofi build-i2e --run``). None or ``"none"``: no
    reuse. A URI with no build under it is an error that says so."""
    if not uri or uri == NONE:
        return None
    uri = str(uri).rstrip("/")
    name = storage.basename(uri)
    if name == I2E_DIR_NAME:
        candidates = [sibling(uri, RUN_DIR_NAME)]
    elif name.startswith(VERSION_PREFIX):
        candidates = [storage.join(uri, RUN_DIR_NAME)]
    else:
        candidates = [uri, storage.join(uri, RUN_DIR_NAME)]
    for run in candidates:
        if RunLayout(run).store("ner").read_plan() is not None:
            parent = storage.basename(run.rsplit("/", 1)[0]) if "/" in run else ""
            label = parent if parent.startswith(VERSION_PREFIX) else run
            return ReuseSource(RunLayout(run), label)
    raise ConfigError(
        f"reuse_from {uri}: no earlier build there (looked for {' and '.join(candidates)}); "
        f"give a version root, its i2e or i2e_run folder, or {NONE!r} for a full rebuild"
    )


def adopt(store: MarkerStore, shards: list[str], source: ReuseSource | None) -> dict[str, Any]:
    """Adopt into ``store`` every shard of ``shards`` (pending, keys set on ``store``) whose key
    matches a done shard of ``source`` whose outputs are as its marker recorded: copy the
    outputs, then write a done marker with ``reused_from``. Returns ``{"adopted": [...],
    "from": label, "copies": {how: n}, "seconds": s}``; the rest is the caller's to compute."""
    out: dict[str, Any] = {"adopted": [], "from": None, "copies": {}, "seconds": 0.0}
    if source is None or not shards:
        return out
    src = source.store(store.stage)
    if src.root.rstrip("/") == store.root.rstrip("/"):
        return out
    t0 = time.time()
    out["from"] = source.label
    recs = src.read_all()
    matches: dict[str, ShardStats] = {}
    for shard in shards:
        rec, want = recs.get(shard), store.keys.get(shard)
        if not want or not rec or rec["state"] != "done":
            continue
        if (rec.get("key") or {}).get("key") == want["key"]:
            matches[shard] = ShardStats.from_dict(rec.get("stats", {}))
    sizes: dict[str, int] = {}
    for folder in {
        output_uri(src.root, n).rsplit("/", 1)[0] for st in matches.values() for n in st.outputs
    }:
        sizes.update(storage.list_sizes(folder))

    def take(shard: str) -> list[str] | None:
        """How each output of ``shard`` was copied; None when it was not adopted."""
        stats = matches[shard]
        problem = outputs_problem(src.root, stats.outputs, sizes)
        if problem:  # the source lost it: computed here instead
            log.warning("%s shard %s not reused from %s: %s", store.stage, shard, src.root, problem)
            return None
        try:
            store.claim(shard)
        except ShardBusy:
            return None
        try:
            hows = [
                storage.copy(output_uri(src.root, name), output_uri(store.root, name))
                for name in stats.outputs
            ]
        except BaseException:
            store.release(shard)
            raise
        origin = {"from": source.label, "run": source.run.root, "shard": shard}
        store.mark_done(shard, stats, reused_from=origin)
        return hows

    copies: collections.Counter[str] = collections.Counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, min(COPY_THREADS, len(matches)))) as pool:
        for shard, hows in zip(sorted(matches), pool.map(take, sorted(matches)), strict=True):
            if hows is not None:
                out["adopted"].append(shard)
                copies.update(hows)
    out["copies"] = dict(copies)
    out["seconds"] = round(time.time() - t0, 2)
    if out["adopted"]:
        log.info(
            "%s: reused %d of %d pending shards from %s (%s)",
            store.stage,
            len(out["adopted"]),
            len(shards),
            source.label,
            dict(copies),
        )
    return out


def adopt_tasks(
    store: MarkerStore, todo: list[ShardTask], source: ReuseSource | None, result: StageResult
) -> list[ShardTask]:
    """:func:`adopt` for a stage's pending tasks: what was adopted goes into ``result``
    (``reused``, ``extra["reuse"]``); returns the tasks still to compute."""
    got = adopt(store, [t.shard for t in todo], source)
    result.reused = {s: got["from"] for s in got["adopted"]}
    result.extra["reuse"] = {k: v for k, v in got.items() if k != "adopted"}
    adopted = set(got["adopted"])
    return [t for t in todo if t.shard not in adopted]
