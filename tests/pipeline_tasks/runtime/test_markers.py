from __future__ import annotations

import pytest

from pipeline_tasks.runtime import markers
from training.core import storage


def test_shard_run_writes_done_marker_with_stats(storage_root):
    store = markers.MarkerStore(storage_root, "ner")
    store.write_plan(["00000", "00001"])
    with markers.ShardRun(store, "00000") as run:
        run.stats.n_in = 10
        run.stats.n_out = 8
        run.stats.drop("empty_caption", 2)
    assert store.is_done("00000")
    assert not store.is_done("00001")
    st = store.read_done("00000")
    assert (st.n_in, st.n_out, st.drops) == (10, 8, {"empty_caption": 2})
    assert st.duration_s >= 0 and st.finished_at >= st.started_at > 0
    recs = store.read_all()
    assert set(recs) == {"00000"} and recs["00000"]["state"] == "done"


def test_failure_writes_failed_marker_and_reraises(storage_root):
    store = markers.MarkerStore(storage_root, "score")
    with pytest.raises(ZeroDivisionError):
        with markers.ShardRun(store, "00003") as run:
            run.stats.n_in = 4
            _ = 1 / 0
    recs = store.read_all()
    assert recs["00003"]["state"] == "failed"
    assert "ZeroDivisionError" in recs["00003"]["error"]
    assert not store.is_done("00003")
    # a retry that succeeds replaces the failed marker
    with markers.ShardRun(store, "00003"):
        pass
    assert store.read_all()["00003"]["state"] == "done"
    assert not storage.exists(storage.join(store.dir, "00003.failed.json"))


def test_running_marker_visible_until_done(storage_root):
    store = markers.MarkerStore(storage_root, "write")
    store.mark_running("00007")
    assert store.read_all()["00007"]["state"] == "running"
    assert markers.list_stages(storage_root) == ["write"]


def test_drop_logger_counts_all_but_logs_few(caplog):
    st = markers.ShardStats()
    drop = markers.DropLogger(st, per_reason=2)
    with caplog.at_level("WARNING"):
        for i in range(10):
            drop("bad_jpeg", f"key {i}")
    assert st.drops == {"bad_jpeg": 10}
    assert len([r for r in caplog.records if "bad_jpeg" in r.getMessage()]) == 2


def test_bad_stage_name():
    with pytest.raises(ValueError):
        markers.MarkerStore("/tmp", "a/b")
