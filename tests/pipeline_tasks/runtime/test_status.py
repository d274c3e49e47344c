from __future__ import annotations

import json
import subprocess
import sys

from pipeline_tasks.runtime import markers, status


def _fake_stage(root, stage, done, failed=(), running=(), planned=None):
    store = markers.MarkerStore(root, stage)
    store.write_plan(
        planned or [markers.shard_id(i) for i in range(len(done) + len(failed) + len(running) + 1)]
    )
    for i, (n_in, n_out, drops) in enumerate(done):
        st = markers.ShardStats(
            n_in=n_in,
            n_out=n_out,
            drops=drops,
            duration_s=2.0,
            started_at=1000.0 + i,
            finished_at=1002.0 + i,
            bytes_out=1024,
        )
        store.mark_done(markers.shard_id(i), st)
    for sid in failed:
        store.mark_failed(sid, "ValueError: bad shard", markers.ShardStats())
    for sid in running:
        store.mark_running(sid)
    return store


def test_summary_counts_states_samples_drops_and_rate(tmp_path):
    root = str(tmp_path / "run" / "ner")
    _fake_stage(
        root,
        "ner",
        [(100, 90, {"empty_caption": 10}), (100, 95, {"empty_caption": 3, "too_long": 2})],
        failed=["00002"],
        running=["00003"],
    )
    (s,) = status.summarize_run(str(tmp_path / "run"))
    assert (s["stage"], s["where"]) == ("ner", "ner")
    assert (s["done"], s["failed"], s["running"], s["pending"], s["shards_total"]) == (
        2,
        1,
        1,
        1,
        5,
    )
    assert (s["samples_in"], s["samples_out"]) == (200, 185)
    assert s["drops"] == {"empty_caption": 13, "too_long": 2}
    assert s["wall_s"] == 3.0 and s["samples_per_s"] == round(200 / 3.0, 2)
    assert s["failed_shards"] == {"00002": "ValueError: bad shard"} and not s["complete"]
    text = status.render([s], "run")
    assert "FAILED" in text and "empty_caption=13" in text and "00002" in text


def test_cli_status_table_json_and_exit_codes(tmp_path):
    run = tmp_path / "run"
    _fake_stage(str(run / "raw"), "corpus", [(10, 10, {})], planned=["00000"])
    out = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks.cli", "-q", "status", str(run)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "corpus" in out.stdout and "complete" in out.stdout
    js = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks.cli", "-q", "status", "--json", str(run)],
        capture_output=True,
        text=True,
    )
    data = json.loads(js.stdout)
    assert data["stages"][0]["complete"] is True
    _fake_stage(str(run / "raw2"), "corpus", [], failed=["00000"], planned=["00000"])
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks.cli", "-q", "status", str(run)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "FAILED" in bad.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks.cli", "-q", "status", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "run not found" in missing.stderr


def test_status_on_s3(s3_bucket):
    _fake_stage(s3_bucket + "/run/raw", "corpus", [(5, 5, {})], planned=["00000", "00001"])
    (s,) = status.summarize_run(s3_bucket + "/run")
    assert (s["done"], s["pending"], s["where"]) == (1, 1, "raw")


def test_stages_found_at_any_depth_stale_and_invalid_shown(tmp_path):
    """A build version holds its stages two levels down; a killed worker's claim is stale, not
    running; a done marker whose file was deleted is invalid and the stage is not complete."""
    import os

    from training.core import storage

    version = tmp_path / "root" / "v=2026-12-01"
    score = str(version / "i2e_run" / "score")
    store = markers.MarkerStore(score, "score")
    store.write_plan(["00000", "00001", "00002"])
    for sid in ("00000", "00001"):
        uri = storage.join(score, f"{sid}.parquet")
        storage.write_bytes(uri, b"x" * 10)
        with markers.ShardRun(store, sid) as run:
            markers.record_outputs(run.stats, score, [uri])
    dead = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from pipeline_tasks.runtime import markers; markers.MarkerStore({score!r}, 'score').claim('00002')",
        ],
        check=True,
    )
    assert dead.returncode == 0
    os.remove(os.path.join(score, "00001.parquet"))
    (s,) = status.summarize_run(str(tmp_path / "root"))
    assert s["where"] == os.path.join("v=2026-12-01", "i2e_run", "score")
    assert (s["done"], s["invalid"], s["running"], s["stale_running"]) == (1, 1, 0, 1)
    assert "process gone" in s["stale_shards"]["00002"]
    assert s["invalid_shards"] == {"00001": "00001.parquet is missing"} and not s["complete"]
    text = status.render([s], "root")
    assert "INVALID" in text and "stale 00002" in text and "invalid 00001" in text
    out = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks.cli", "-q", "status", str(tmp_path / "root")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "nothing has run" not in out.stdout
