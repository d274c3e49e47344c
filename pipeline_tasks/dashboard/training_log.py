"""A training run's progress from what ``mofi train`` leaves in its folder.

``OUT/metrics.jsonl`` (one line per optimiser step: step, loss, loss_class, loss_contrast,
lr, scale, samples_per_s, elapsed_s), ``OUT/train.config.json`` and, once finished,
``OUT/model.pt``. A local log is read incrementally: a poll reads only the lines appended
since the last one (a log rewritten by a resume, which trims the steps it will redo, is
noticed and read again whole).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from training.core import storage
from training.layout import TrainLayout

SERIES = ("loss", "loss_class", "loss_contrast", "lr", "samples_per_s", "elapsed_s")
_TAIL = 64  # bytes before the read offset that must be unchanged for an incremental read


class _Log:
    """The parsed lines of one metrics log, column by column."""

    def __init__(self) -> None:
        self.version: Any = None
        self.offset = 0
        self.tail = b""
        self.step: list[int] = []
        self.cols: dict[str, list[float | None]] = {k: [] for k in SERIES}

    def add_lines(self, data: bytes) -> None:
        for line in data.splitlines():
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: skipped, the next ones still count
            # a resumed run redoes steps after its checkpoint: its lines replace the old ones
            while self.step and self.step[-1] >= step:
                self.step.pop()
                for col in self.cols.values():
                    col.pop()
            self.step.append(step)
            for k, col in self.cols.items():
                v = rec.get(k)
                col.append(float(v) if isinstance(v, int | float) else None)


class TrainingLogReader:
    """Cached reads of training folders (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logs: dict[str, _Log] = {}
        self._configs: dict[str, tuple[Any, dict[str, Any] | None]] = {}

    def _read_local(self, path: str) -> _Log:
        log = self._logs.get(path) or _Log()
        st = os.stat(path)
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        if version == log.version:
            return log
        with open(path, "rb") as f:
            same_file = log.version is not None and log.version[0] == st.st_ino
            if same_file and st.st_size >= log.offset:
                f.seek(max(0, log.offset - len(log.tail)))
                if f.read(len(log.tail)) != log.tail:
                    same_file = False  # rewritten in place (a resume trimmed it)
            if not same_file or st.st_size < log.offset:
                log = _Log()
                f.seek(0)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        log.add_lines(data[:end])
        log.offset += end
        f_tail_start = max(0, end - _TAIL)
        if end:
            log.tail = data[f_tail_start:end]
        log.version = version
        self._logs[path] = log
        return log

    def _read_whole(self, uri: str) -> _Log:
        log = _Log()
        log.add_lines(storage.read_bytes(uri))
        return log

    def _config(self, folder: str) -> dict[str, Any] | None:
        uri = TrainLayout(folder).config
        try:
            version = (
                os.stat(uri).st_mtime_ns if not storage.is_s3(uri) else storage.fingerprint(uri)
            )
        except FileNotFoundError:
            return None
        hit = self._configs.get(uri)
        if hit and hit[0] == version:
            return hit[1]
        try:
            doc = storage.read_json(uri)
        except (FileNotFoundError, ValueError):
            doc = None
        self._configs[uri] = (version, doc)
        return doc

    def read(
        self, folder: str, where: str, points: int, now: float | None = None
    ) -> dict[str, Any]:
        """The training run in ``folder``: its latest step and its curves thinned to at most
        ``points`` points (the last step always kept)."""
        now = time.time() if now is None else now
        uri = TrainLayout(folder).metrics
        with self._lock:
            if storage.is_s3(uri):
                log, updated = self._read_whole(uri), None
            else:
                log = self._read_local(uri)
                updated = os.stat(uri).st_mtime
            cfg = self._config(folder)
        finished = storage.exists(TrainLayout(folder).model)
        n = len(log.step)
        last = {k: (log.cols[k][-1] if n else None) for k in SERIES}
        # silent: no step for 20 typical step times (at least 2 minutes)
        gaps = [
            b - a
            for a, b in zip(
                log.cols["elapsed_s"][-21:-1], log.cols["elapsed_s"][-20:], strict=False
            )
            if a is not None and b is not None
        ]
        typical = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
        if finished:
            state = "finished"
        elif updated is not None and now - updated > max(120.0, 20 * typical):
            state = "silent"
        else:
            state = "running"
        stride = max(1, -(-n // points))
        idx = list(range(0, n, stride))
        if n and idx[-1] != n - 1:
            idx.append(n - 1)
        return {
            "where": where,
            "uri": folder,
            "state": state,
            "steps_logged": n,
            "step": log.step[-1] if n else None,
            **last,
            "last_update": updated,
            "config": _config_brief(cfg),
            "curve": {
                "step": [log.step[i] for i in idx],
                **{
                    k: [log.cols[k][i] for i in idx]
                    for k in ("loss", "loss_class", "loss_contrast", "samples_per_s")
                },
            },
        }


def _config_brief(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    if not cfg:
        return None
    data, dist, loss = cfg.get("data", {}), cfg.get("dist", {}), cfg.get("loss", {})
    return {
        "name": cfg.get("name"),
        "mode": loss.get("mode"),
        "epochs": cfg.get("epochs"),
        "max_steps": cfg.get("max_steps") or None,
        "batch_size": data.get("batch_size"),
        "processes": (dist.get("nproc_per_node") or 1) * (dist.get("nnodes") or 1),
        "image_tower": cfg.get("model", {}).get("image_tower"),
    }
