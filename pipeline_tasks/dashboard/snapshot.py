"""One consistent picture of every run, training and evaluation the dashboard watches.

:class:`SnapshotBuilder` reads the roots of a :class:`DashboardConfig` through one
:class:`status.MarkerReader` (cached by file version, S3 listings paginated and cached), so
a page polling every few seconds and a Prometheus scrape re-read only what changed; a
snapshot younger than ``max_age_s`` is served as is. The JSON endpoints and ``/metrics``
are views of it. A root that cannot be read (missing, S3 unreachable) is reported in the
snapshot with its error; it never hides the other roots.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from training.core import storage

from ..runtime import status
from .config import DashboardConfig
from .results_reader import ResultsReader
from .runs import Run, find_runs, root_labels
from .training_log import TrainingLogReader

COUNTS = ("shards_total", "done", "failed", "running", "stale_running", "invalid", "pending")


def _listed(shards: dict[str, Any], limit: int, key: str) -> list[dict[str, Any]]:
    return [{"shard": s, key: v} for s, v in sorted(shards.items())[:limit]]


def stage_view(s: dict[str, Any], limit: int) -> dict[str, Any]:
    """A ``status.summarize_stage`` summary as the API shows it: shard lists as lists, at
    most ``limit`` of each kind (their counts stay exact) and the stage's state. The six
    counts split the planned shards: done + failed + running + stale_running + invalid +
    pending = shards_total."""
    out = {k: v for k, v in s.items() if not k.endswith("_shards")}
    out["state"] = status.state_of(s).lower()
    out["failed_shards"] = _listed(s["failed_shards"], limit, "error")
    out["stale_shards"] = _listed(s["stale_shards"], limit, "why")
    out["invalid_shards"] = _listed(s["invalid_shards"], limit, "why")
    out["reused_shards"] = _listed(s.get("reused_shards", {}), limit, "from")
    out["running_shards"] = [
        {"shard": k, **v} for k, v in sorted(s["running_shards"].items())[:limit]
    ]
    return out


def run_state(stages: list[dict[str, Any]], training: list[dict[str, Any]]) -> str:
    """failed > running > stale > complete > incomplete (idle, some shards left) > empty."""
    if any(s["failed"] or s["invalid"] for s in stages):
        return "failed"
    if any(s["running"] for s in stages) or any(t["state"] == "running" for t in training):
        return "running"
    if any(s["stale_running"] for s in stages):
        return "stale"
    if stages and all(s["complete"] for s in stages):
        return "complete"
    if stages:
        return "incomplete"
    return "complete" if training and all(t["state"] == "finished" for t in training) else "empty"


class SnapshotBuilder:
    """Builds (and briefly caches) the dashboard's snapshot; thread-safe."""

    def __init__(self, config: DashboardConfig, reader: status.MarkerReader | None = None):
        self.config = config
        self.reader = reader or status.MarkerReader()
        self.training = TrainingLogReader()
        self.results = ResultsReader(config.results, config.results_limit)
        self.labels = root_labels(config.roots)
        self._lock = threading.Lock()
        self._cached: dict[str, Any] | None = None

    def snapshot(self, max_age_s: float | None = None) -> dict[str, Any]:
        max_age = self.config.max_age_s if max_age_s is None else max_age_s
        with self._lock:  # one reader at a time; the others get its fresh result
            if self._cached and time.time() - self._cached["generated_at"] <= max_age:
                return self._cached
            self._cached = self._build()
            return self._cached

    def _build(self) -> dict[str, Any]:
        t0 = time.time()
        roots, runs = [], []
        for root in self.config.roots:
            label = self.labels[root]
            try:
                found = find_runs(self.reader, root, label)
                runs.extend(self._run(r) for r in found)
                roots.append({"uri": root, "label": label, "runs": len(found), "error": None})
            except (FileNotFoundError, storage.StorageError, OSError) as exc:
                msg = " ".join(str(exc).split())
                roots.append({"uri": root, "label": label, "runs": 0, "error": msg})
        return {
            "generated_at": time.time(),
            "read_s": round(time.time() - t0, 3),
            "refresh_s": self.config.refresh_s,
            "roots": roots,
            "runs": runs,
            "results": self.results.read(),
        }

    def _run(self, run: Run) -> dict[str, Any]:
        now = time.time()
        stages = []
        for where, root in run.stage_roots:
            for stage in status.stages(self.reader, root):
                s = status.summarize_stage(root, stage, now, self.reader)
                s["where"] = where
                stages.append(stage_view(s, self.config.shards_listed))
        stages.sort(key=status.display_order)
        training = []
        for where, folder in run.training:
            try:
                training.append(self.training.read(folder, where, self.config.curve_points, now))
            except (FileNotFoundError, storage.StorageError) as exc:  # vanished between reads
                training.append(
                    {"where": where, "uri": folder, "state": "unreadable", "error": str(exc)}
                )
        training.sort(key=lambda t: -(t.get("last_update") or 0))
        totals = {k: sum(s[k] for s in stages) for k in COUNTS}
        totals["samples_in"] = sum(s["samples_in"] for s in stages)
        updates = [s["last_update"] for s in stages] + [t.get("last_update") or 0 for t in training]
        return {
            "id": run.id,
            "uri": run.uri,
            "root": run.root,
            "state": run_state(stages, training),
            "last_update": max(updates, default=0.0) or None,
            "totals": totals,
            "stages": stages,
            "training": training,
        }

    def run(self, run_id: str) -> dict[str, Any] | None:
        return next((r for r in self.snapshot()["runs"] if r["id"] == run_id), None)
