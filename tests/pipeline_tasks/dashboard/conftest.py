"""Marker trees written with the real MarkerStore: every shard state the dashboard shows."""

from __future__ import annotations

import os
import time

import pytest
from dashboard_trees import DOMAINS, dead_pid, write_claim, write_done, write_training

from pipeline_tasks.runtime import markers


@pytest.fixture
def marker_tree(tmp_path):
    """Two roots: ``demo`` (a CLI build: every shard state, a training run) and ``builds``
    (two Airflow partitions), plus a results store with two evaluations."""
    from evaluation import results

    demo = tmp_path / "runs" / "demo"
    ner = markers.MarkerStore(str(demo / "i2e_run" / "ner"), "ner")
    ner.write_plan([markers.shard_id(i) for i in range(8)])
    write_done(ner, "00000", 100, 90, {"caption_empty": 6, "caption_not_utf8": 4})
    write_done(ner, "00001", 100, 97, {"caption_empty": 3})
    invalid_out = write_done(ner, "00002", 100, 100)
    os.remove(invalid_out)  # its done marker no longer matches storage: invalid
    ner.mark_failed("00003", "ValueError: shard 00003 has no caption column", markers.ShardStats())
    write_claim(ner, "00004", os.getpid(), time.time())  # live: this process, fresh beat
    write_claim(ner, "00005", dead_pid(), time.time())  # stale: process gone
    # 00006, 00007: pending
    score = markers.MarkerStore(str(demo / "i2e_run" / "score"), "score")
    score.write_plan(["00000", "00001"])
    write_done(score, "00000", 90, 90, {"image_corrupt": 2})
    write_done(score, "00001", 97, 97)
    write_training(demo / "train", 30)

    builds = tmp_path / "builds"
    for day, n_done in (("2026-11-23", 3), ("2026-11-24", 1)):
        w = markers.MarkerStore(str(builds / f"v={day}" / "i2e"), "write")
        w.write_plan([markers.shard_id(i) for i in range(3)])
        for i in range(n_done):
            write_done(w, markers.shard_id(i), 50, 50)

    db = f"sqlite:///{tmp_path}/results.sqlite"
    for run_id, model, base in (("packaged", "packaged", 0.60), ("train-1", "model.pt", 0.70)):
        m = {"map": base, "zero_shot/top1": 0.4, "linear_probe/top1": 0.8}
        m.update({f"map/{d}": round(base + 0.01 * i, 4) for i, d in enumerate(DOMAINS)})
        results.append_result(
            db, {"run_id": run_id, "model": model, "images": "runs/demo/eval", "metrics": m}
        )
    return {
        "demo": str(demo),
        "builds": str(builds),
        "missing": str(tmp_path / "nothing-here"),
        "results": db,
        "tmp": tmp_path,
    }
