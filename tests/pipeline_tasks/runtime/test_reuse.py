"""Adoption of an earlier build's shards (``runtime.reuse.adopt``), on local disk and on S3:
what matches is copied (a hard link, a server-side copy) and marked reused; what does not
match, or what the source lost, is left to compute."""

from __future__ import annotations

import os

import pytest

from pipeline_tasks.runtime import reuse
from pipeline_tasks.runtime.layout import NER, RunLayout
from pipeline_tasks.runtime.markers import ShardStats, record_outputs
from training.core import storage


def _key(parquet: str) -> dict:
    return reuse.make_key(NER, {"raw_parquet": parquet, "kb": "sha256:kb"})


def _source(root: str) -> RunLayout:
    """An earlier build's ner: shards 00000-00002 done with their outputs and keys."""
    layout = RunLayout(storage.join(root, "old", "i2e_run"))
    store = layout.store(NER)
    store.write_plan(["00000", "00001", "00002"])
    store.keys = {s: _key(f"sha256:{s}") for s in ("00000", "00001", "00002")}
    for s in ("00000", "00001", "00002"):
        uri = layout.output(NER, s)
        storage.write_bytes(uri, f"mentions of {s}".encode() * 10)
        st = ShardStats(n_in=10, n_out=10)
        record_outputs(st, store.root, [uri])
        store.mark_done(s, st)
    return layout


def test_adopt_copies_what_matches_and_leaves_the_rest(storage_root):
    src = _source(storage_root)
    # the source lost 00002's output after its marker was written
    storage.write_bytes(src.output(NER, "00002"), b"torn")
    dst = RunLayout(storage.join(storage_root, "new", "i2e_run"))
    store = dst.store(NER)
    store.keys = {
        "00000": _key("sha256:00000"),  # unchanged
        "00001": _key("sha256:changed"),  # re-crawled: other bytes
        "00002": _key("sha256:00002"),  # unchanged, but the source's copy is damaged
        "00003": _key("sha256:00003"),  # new
    }
    source = reuse.resolve_source(storage.join(storage_root, "old"))
    assert source.run.root == src.root
    got = reuse.adopt(store, sorted(store.keys), source)
    assert got["adopted"] == ["00000"]
    assert got["copies"] == {"server" if storage.is_s3(storage_root) else "link": 1}
    assert storage.read_bytes(dst.output(NER, "00000")) == storage.read_bytes(
        src.output(NER, "00000")
    )
    rec = store.read_all()["00000"]
    assert rec["state"] == "done" and rec["key"] == store.keys["00000"]
    assert rec["reused_from"] == {"from": source.label, "run": src.root, "shard": "00000"}
    assert rec["stats"]["n_in"] == 10 and store.is_complete("00000")
    assert sorted(store.read_all()) == ["00000"]  # no claim left behind, nothing else marked
    if not storage.is_s3(storage_root):  # one inode, two versions
        assert os.path.samefile(dst.output(NER, "00000"), src.output(NER, "00000"))


def test_content_ids_change_with_the_bytes(storage_root):
    uri = storage.join(storage_root, "raw", "00000.tar")
    storage.write_bytes(uri, b"a" * 100)
    first = storage.content_id(uri)
    storage.write_bytes(uri, b"b" * 100)  # same name, same size, other bytes
    assert storage.content_id(uri) != first
    storage.write_bytes(uri, b"a" * 100)
    assert storage.content_id(uri) == first
    assert first.startswith("etag:" if storage.is_s3(storage_root) else "sha256:")


def test_a_copy_is_published_whole_and_a_missing_source_is_named(storage_root):
    src = storage.join(storage_root, "a", "x.parquet")
    dst = storage.join(storage_root, "b", "x.parquet")
    storage.write_bytes(src, b"0123456789" * 1000)
    storage.copy(src, dst)
    assert storage.read_bytes(dst) == storage.read_bytes(src)
    assert storage.list_files(storage.join(storage_root, "b")) == [dst]  # no temp left
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        storage.copy(storage.join(storage_root, "a", "missing.parquet"), dst)
