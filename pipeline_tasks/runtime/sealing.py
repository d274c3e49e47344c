"""Sealed stages: the summary of a complete stage, written once, read instead of its markers.

``runtime.status`` summarises a stage from every marker. Once the stage is complete (every
planned shard done, its outputs as recorded, nothing running or failed), that read *seals*
it: it writes the summary to ``_markers/STAGE/_summary.json`` with the body's size and
sha256, then lists the markers again and withdraws the summary if any changed meanwhile.
Later reads of the stage read and verify that one file, so status over a finished build of
100,000 shards x 5 stages costs a few requests on S3 and milliseconds locally, not 550,000
reads. A writer that reopens a stage (a new plan, a claim, a withdrawn done marker) deletes
the summary after its change (``MarkerStore.drop_summary``): either the sealer's second
listing sees the change, or the writer's delete comes after the seal.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from training.core import storage

from . import markers


def sealable(s: dict[str, Any]) -> bool:
    return bool(s["complete"]) and not any(
        s[k] for k in ("failed", "running", "stale_running", "invalid", "pending")
    )


def read_sealed(store: markers.MarkerStore) -> dict[str, Any] | None:
    """The stage's sealed summary, or None (none yet, or a file whose size or sha256 does
    not match what it records: torn or edited, so the markers are read instead)."""
    try:
        doc = json.loads(storage.read_bytes(store.summary_uri))
        body = doc["body"].encode()
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if len(body) != doc.get("size") or hashlib.sha256(body).hexdigest() != doc.get("sha256"):
        return None
    return json.loads(body)


def seal(
    store: markers.MarkerStore, summary: dict[str, Any], seen: set, relist: Callable[[], set]
) -> bool:
    """Write the summary of a complete stage, then list its markers again (``relist``: the
    marker folder's (uri, version) pairs, fresh): if any changed since ``seen`` (the listing
    the summary was made from), withdraw it. A writer that changes a marker later deletes it
    itself (``drop_summary``). False when not sealed (changed, or storage refused the write:
    a read-only dashboard)."""
    body = json.dumps(
        {**summary, "sealed_at": time.time()}, sort_keys=True, separators=(",", ":")
    ).encode()
    doc = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(), "body": body.decode()}
    try:
        storage.write_json(store.summary_uri, doc, indent=None)
    except (OSError, storage.StorageError):
        return False
    summary_uri = store.summary_uri
    if {x for x in relist() if x[0] != summary_uri} != {x for x in seen if x[0] != summary_uri}:
        store.drop_summary()
        return False
    return True
