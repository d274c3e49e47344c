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


def test_claims_are_exclusive_and_a_dead_claim_is_taken_over(storage_root):
    import subprocess
    import sys

    store = markers.MarkerStore(storage_root, "write")
    store.claim("00001")
    with pytest.raises(markers.ShardBusy, match="write shard 00001 is being processed by"):
        markers.MarkerStore(storage_root, "write").claim("00001")
    store.release("00001")
    if storage.is_s3(storage_root):
        return
    # a claim whose process is gone is stale: the next claim takes it over
    code = (
        "from pipeline_tasks.runtime import markers; "
        f"markers.MarkerStore({storage_root!r}, 'write').claim('00002')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert store.read_all()["00002"]["state"] == "running"
    rec = store.claim("00002")
    assert rec["pid"] == __import__("os").getpid()


def test_done_marker_vouches_for_its_outputs(storage_root):
    store = markers.MarkerStore(storage_root, "score")
    uri = storage.join(storage_root, "00000.parquet")
    storage.write_bytes(uri, b"0123456789")
    with markers.ShardRun(store, "00000") as run:
        markers.record_outputs(run.stats, storage_root, [uri])
    st = store.read_done("00000")
    assert (
        st.outputs == {"00000.parquet": {"size": 10, "sha256": storage.sha256(uri)}}
        and st.bytes_out == 10
    )
    assert store.verify("00000") is None and store.is_complete("00000")
    storage.write_bytes(uri, b"01234")  # truncated behind the marker's back
    assert "has 5 bytes, its done marker recorded 10" in store.verify("00000")
    storage.write_bytes(uri, b"9876543210")  # same size, other bytes: only a deep check sees it
    assert store.verify("00000") is None
    assert "sha256" in store.verify("00000", deep=True)
    storage.delete(uri)
    assert markers.verify_done(store, ["00000", "00001"]) == {
        "00000": "00000.parquet is missing",
        "00001": "no done marker",
    }


def test_completed_shards_name_the_missing_stage_and_the_pending_shards(tmp_path):
    store = markers.MarkerStore(str(tmp_path / "score"), "score")
    with pytest.raises(FileNotFoundError, match="no score stage under .*run `mofi score` first"):
        markers.completed_shards(store, "score")
    store.write_plan(["00000", "00001"])
    out = tmp_path / "score" / "00000.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"x" * 10)
    st = markers.ShardStats()
    markers.record_outputs(st, store.root, [str(out)])
    store.mark_done("00000", st)
    with pytest.raises(FileNotFoundError, match="1 of 2 shards pending.*00001"):
        markers.completed_shards(store, "score")
    store.mark_done("00001", markers.ShardStats())
    assert markers.completed_shards(store, "score") == ["00000", "00001"]
    out.write_bytes(b"x")  # a done marker that no longer matches its file is pending again
    with pytest.raises(FileNotFoundError, match="00000.parquet has 1 bytes"):
        markers.completed_shards(store, "score")
