"""Sealed stages: a complete stage is read from one verified summary, reopened by any claim,
and a finished build's status on S3 costs the same requests at any shard count."""

from __future__ import annotations

import json
import os
import time

import pytest

from pipeline_tasks.runtime import heartbeats, markers, sealing, status
from training.core import process


def _complete_stage(root: str, stage: str, n: int) -> markers.MarkerStore:
    store = markers.MarkerStore(root, stage)
    ids = [markers.shard_id(i) for i in range(n)]
    store.write_plan(ids)
    for i, sid in enumerate(ids):
        st = markers.ShardStats(
            n_in=10, n_out=9, drops={"caption_empty": 1}, duration_s=1.0,
            started_at=100.0 + i, finished_at=101.0 + i,
        )  # fmt: skip
        store.mark_done(sid, st)
    return store


def test_complete_stage_is_sealed_read_from_its_summary_and_reopened_by_a_claim(tmp_path):
    root = str(tmp_path / "run")
    store = _complete_stage(root, "ner", 4)
    first = status.summarize_stage(root, "ner", reader=status.MarkerReader())
    assert first["complete"] and not first.get("sealed")
    assert os.path.exists(store.summary_uri)
    # the summary, not the markers, answers now: a marker removed behind status's back (no
    # writer of the pipeline does that) shows only in --verify
    os.remove(store._uri("00003", "done"))
    sealed = status.summarize_stage(root, "ner", reader=status.MarkerReader())
    assert sealed["sealed"] and (sealed["done"], sealed["samples_in"]) == (4, 40)
    assert sealed["drops"] == {"caption_empty": 4}
    deep = status.summarize_stage(root, "ner", reader=status.MarkerReader(), sealed=False)
    assert (deep["done"], deep["pending"]) == (3, 1)
    # a claim reopens the stage: its summary is gone and the markers are read again
    store.claim("00003")
    assert not os.path.exists(store.summary_uri)
    live = status.summarize_stage(root, "ner", reader=status.MarkerReader())
    assert not live.get("sealed") and (live["done"], live["running"]) == (3, 1)
    markers.HEARTBEATS.remove(store._uri("00003", "running"))


def test_a_summary_whose_checksum_does_not_match_is_not_trusted(tmp_path):
    root = str(tmp_path / "run")
    store = _complete_stage(root, "score", 3)
    status.summarize_stage(root, "score", reader=status.MarkerReader())
    assert sealing.read_sealed(store)["done"] == 3
    doc = json.loads(open(store.summary_uri).read())
    doc["body"] = doc["body"].replace('"done":3', '"done":2')  # edited, size kept
    assert '"done":2' in doc["body"]
    with open(store.summary_uri, "w") as f:
        json.dump(doc, f)
    assert sealing.read_sealed(store) is None
    with open(store.summary_uri, "w") as f:
        f.write('{"size": 10, "sha')  # torn
    assert sealing.read_sealed(store) is None
    s = status.summarize_stage(root, "score", reader=status.MarkerReader())
    assert s["done"] == 3 and not s.get("sealed")  # from the markers, and sealed again
    assert sealing.read_sealed(store)["done"] == 3


def test_a_seal_made_while_a_marker_changed_is_withdrawn(tmp_path):
    """The sealer lists the markers again after writing: a claim made between its read and
    its write (whose own summary delete came too early to matter) withdraws the seal."""
    root = str(tmp_path / "run")
    store = _complete_stage(root, "write", 2)
    reader = status.MarkerReader()
    seen = {(u, v) for u, v, _ in reader.list_dir(store.dir)}
    summary = status._summarize_markers(store, 0.0, reader)
    assert sealing.sealable(summary)
    store.unmark_done("00001")  # the other writer: after its change it deleted no summary yet
    assert not os.path.exists(store._uri("00001", "done"))
    relist = lambda: {(u, v) for u, v, _ in status.MarkerReader().list_dir(store.dir)}  # noqa: E731
    assert sealing.seal(store, summary, seen, relist) is False
    assert not os.path.exists(store.summary_uri)
    s = status.summarize_stage(root, "write", reader=status.MarkerReader())
    assert (s["done"], s["pending"], s.get("sealed")) == (1, 1, None)


@pytest.mark.s3
def test_status_requests_of_a_finished_build_do_not_grow_with_its_shards(s3_bucket, monkeypatch):
    """Counts the requests status makes under the build's folder. The process's heartbeat
    thread shares the S3 client: here it beats fast for a claim held elsewhere in the bucket,
    and is seen overlapping the counted read, as a claim left by an earlier test would be."""
    from training.core import storage

    bucket = storage.split_s3(s3_bucket)[0]
    calls: list[tuple[str, str]] = []  # (key or prefix, request)

    def note(params, model, **_):
        if params.get("Bucket") == bucket:
            calls.append((params.get("Key", params.get("Prefix", "")), model.name))

    storage.s3_client().meta.events.register("before-parameter-build.s3.*", note)
    monkeypatch.setattr(heartbeats, "HEARTBEAT_S", 0.02)
    busy = markers.MarkerStore(f"{s3_bucket}/elsewhere/i2e_run/ner", "ner")
    busy.claim("00000")
    calls.clear()  # the claim's own write is no beat

    def beats() -> int:
        return sum(k.startswith("elsewhere/") and r == "PutObject" for k, r in calls)

    deadline = time.time() + 2 * process.HEARTBEAT_S + 5  # a beat already asleep ends first
    while not beats() and time.time() < deadline:
        time.sleep(0.05)
    assert beats(), "the heartbeat thread never beat"
    warm = {}
    try:
        for n in (5, 40):
            top = f"{s3_bucket}/n{n}/v=2026-12-05"
            for folder, stage in (
                ("i2e_run/ner", "ner"),
                ("i2e_run/score", "score"),
                ("i2e", "write"),
            ):
                root = f"{top}/{folder}"
                _complete_stage(root, stage, n)
                for i in range(n):  # the shard files the stage wrote beside its markers
                    storage.write_bytes(f"{root}/{markers.shard_id(i)}.parquet", b"x")
            status.summarize_run(f"{s3_bucket}/n{n}", status.MarkerReader())  # seals
            until = time.time() + 20
            while True:  # until a beat falls inside the counted read
                calls.clear()
                summaries = status.summarize_run(f"{s3_bucket}/n{n}", status.MarkerReader())
                assert len(summaries) == 3
                assert all(s["sealed"] and s["done"] == n for s in summaries)
                mine = sorted(r for k, r in calls if k.startswith(f"n{n}/"))
                assert warm.setdefault(n, mine) == mine
                if beats():
                    break
                if time.time() > until:
                    pytest.fail("no heartbeat overlapped the counted status read")
    finally:
        busy.release("00000")
    assert warm[5] == warm[40]
    assert warm[5].count("GetObject") == 3 and len(warm[5]) < 20
