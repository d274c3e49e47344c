"""Shard progress of a run, read from the markers: what ``mofi status`` prints and dashboards read."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from training.core import storage

from . import markers

STALE_RUNNING_S = 6 * 3600
# pipeline order for display; unknown stages go last, alphabetically
STAGE_ORDER = [
    "pictures",
    "corpus",
    "kb",
    "ner",
    "score",
    "vocab",
    "labels",
    "write",
    "train",
    "eval",
]


def _roots(run_uri: str) -> list[tuple[str, str]]:
    """(label, root) pairs: the run root itself and its direct children that hold markers."""
    found: list[tuple[str, str]] = []
    if markers.list_stages(run_uri):
        found.append(("", run_uri))
    if storage.is_s3(run_uri):
        bucket, key = storage.split_s3(run_uri)
        prefix = key.rstrip("/") + "/" if key else ""
        paginator = storage.s3_client().get_paginator("list_objects_v2")
        children = set()
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                children.add(cp["Prefix"][len(prefix) :].rstrip("/"))
        names = sorted(children)
    else:
        import os

        names = (
            sorted(d for d in os.listdir(run_uri) if os.path.isdir(os.path.join(run_uri, d)))
            if os.path.isdir(run_uri)
            else []
        )
    for name in names:
        if name.startswith((".", "_")):
            continue
        child = storage.join(run_uri, name)
        if markers.list_stages(child):
            found.append((name, child))
    return found


def summarize_stage(root: str, stage: str, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    store = markers.MarkerStore(root, stage)
    plan = store.read_plan()
    recs = store.read_all()
    planned = set(plan["shards"]) if plan else set()
    counts: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    n_in = n_out = bytes_out = 0
    busy_s = 0.0
    first_start, last_end = None, None
    failed: dict[str, str] = {}
    stale = 0
    for shard, rec in recs.items():
        state = rec["state"]
        counts[state] += 1
        if state == "running":
            if now - float(rec.get("started_at", now)) > STALE_RUNNING_S:
                stale += 1
            continue
        st = markers.ShardStats.from_dict(rec.get("stats", {}))
        if state == "failed":
            failed[shard] = rec.get("error", "")
        if state == "done":
            n_in += st.n_in
            n_out += st.n_out
            bytes_out += st.bytes_out
            busy_s += st.duration_s
            drops.update(st.drops)
            if st.started_at:
                first_start = (
                    st.started_at if first_start is None else min(first_start, st.started_at)
                )
            if st.finished_at:
                last_end = st.finished_at if last_end is None else max(last_end, st.finished_at)
    total = len(planned | set(recs)) if planned else len(recs)
    pending = max(0, total - counts["done"] - counts["failed"] - counts["running"])
    wall = (
        (last_end - first_start) if (first_start and last_end and last_end > first_start) else 0.0
    )
    return {
        "root": root,
        "stage": stage,
        "shards_total": total,
        "done": counts["done"],
        "failed": counts["failed"],
        "running": counts["running"],
        "stale_running": stale,
        "pending": pending,
        "samples_in": n_in,
        "samples_out": n_out,
        "drops": dict(sorted(drops.items(), key=lambda kv: -kv[1])),
        "bytes_out": bytes_out,
        "busy_s": round(busy_s, 3),
        "wall_s": round(wall, 3),
        "samples_per_s": round(n_in / wall, 2) if wall else None,
        "samples_per_busy_s": round(n_in / busy_s, 2) if busy_s else None,
        "failed_shards": failed,
        "complete": total > 0 and counts["done"] == total,
    }


def summarize_run(run_uri: str) -> list[dict[str, Any]]:
    if not storage.is_s3(run_uri):
        import os

        if not os.path.exists(run_uri):
            raise FileNotFoundError(f"run not found: {run_uri}")
    out = []
    for label, root in _roots(run_uri):
        for stage in markers.list_stages(root):
            s = summarize_stage(root, stage)
            s["where"] = label or "."
            out.append(s)
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(out, key=lambda s: (rank.get(s["stage"], len(rank)), s["stage"], s["where"]))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def render(summaries: list[dict[str, Any]], run_uri: str) -> str:
    if not summaries:
        return f"{run_uri}: no stage markers found (nothing has run here yet)"
    lines = [f"run {run_uri}"]
    header = f"{'stage':<18}{'where':<10}{'done':>6}{'fail':>6}{'run':>5}{'pend':>6}  {'in':>9}{'out':>9}  {'rate/s':>8}  {'bytes':>9}  state"
    lines.append(header)
    lines.append("-" * len(header))
    for s in summaries:
        if s["failed"]:
            state = "FAILED"
        elif s["complete"]:
            state = "complete"
        elif s["running"]:
            state = "running" + (f" ({s['stale_running']} stale)" if s["stale_running"] else "")
        else:
            state = "incomplete"
        rate = f"{s['samples_per_s']:.1f}" if s["samples_per_s"] else "-"
        lines.append(
            f"{s['stage']:<18}{s['where']:<10}{s['done']:>6}{s['failed']:>6}{s['running']:>5}{s['pending']:>6}"
            f"  {s['samples_in']:>9}{s['samples_out']:>9}  {rate:>8}  {_human_bytes(s['bytes_out']):>9}  {state}"
        )
        if s["drops"]:
            drops = ", ".join(f"{k}={v}" for k, v in s["drops"].items())
            lines.append(f"{'':<18}drops: {drops}")
        for shard, err in sorted(s["failed_shards"].items())[:5]:
            lines.append(f"{'':<18}failed {shard}: {err[:160]}")
        if len(s["failed_shards"]) > 5:
            lines.append(f"{'':<18}... and {len(s['failed_shards']) - 5} more failed shards")
    return "\n".join(lines)
