"""The storage API on local disk and against a real moto S3 server (HTTP on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest

from training.core import storage


def test_write_read_exists_size(storage_root):
    uri = storage.join(storage_root, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello"
    assert storage.size(uri) == 5
    storage.write_json(storage.join(storage_root, "x.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(storage_root, "x.json")) == {"k": [1, 2]}


def test_missing_file_raises_file_not_found_naming_it(storage_root):
    uri = storage.join(storage_root, "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        storage.read_bytes(uri)


def test_failed_write_publishes_nothing_and_leaves_no_listing(storage_root):
    uri = storage.join(storage_root, "shard.tar")
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as f:
            f.write(b"partial data")
            raise RuntimeError("worker died")
    assert not storage.exists(uri)
    assert storage.list_files(storage_root, recursive=True) == []
    if not storage.is_s3(storage_root):
        assert not any(storage.TEMP_MARK in n for n in os.listdir(storage_root))


def test_overwrite_is_atomic_replacement(storage_root):
    uri = storage.join(storage_root, "f.txt")
    storage.write_text(uri, "one")
    with pytest.raises(ValueError):
        with storage.open_write(uri) as f:
            f.write(b"two-partial")
            raise ValueError("boom")
    assert storage.read_text(uri) == "one"
    storage.write_text(uri, "two")
    assert storage.read_text(uri) == "two"


def test_list_ignores_temp_names_and_filters_suffix(storage_root):
    for name in ("00001.tar", "00000.tar", "00000.parquet", "sub/00002.tar"):
        storage.write_bytes(storage.join(storage_root, name), b"x")
    # A temp file left by a killed writer (locally) or a stray object named like one (S3).
    storage.write_bytes(storage.join(storage_root, ".00003.tar" + storage.TEMP_MARK + "abc"), b"x")
    names = [storage.basename(u) for u in storage.list_files(storage_root)]
    assert names == ["00000.parquet", "00000.tar", "00001.tar"]
    assert [storage.basename(u) for u in storage.list_files(storage_root, suffix=".tar")] == [
        "00000.tar",
        "00001.tar",
    ]
    deep = [
        storage.basename(u) for u in storage.list_files(storage_root, suffix=".tar", recursive=True)
    ]
    assert deep == ["00000.tar", "00001.tar", "00002.tar"]
    assert storage.list_files(storage.join(storage_root, "missing")) == []


def test_large_write_goes_multipart_and_round_trips(storage_root):
    data = os.urandom(storage.S3_PART_SIZE * 2 + 12345)
    uri = storage.join(storage_root, "big.bin")
    with storage.open_write(uri) as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i : i + (1 << 20)])
    assert storage.size(uri) == len(data)
    assert storage.read_bytes(uri) == data


def test_publish_file_and_local_path(storage_root, tmp_path):
    src = tmp_path / "local.bin"
    src.write_bytes(b"payload")
    uri = storage.join(storage_root, "pub", "obj.bin")
    storage.publish_file(str(src), uri)
    with storage.local_path(uri) as p:
        assert open(p, "rb").read() == b"payload"
    storage.delete(uri)
    assert not storage.exists(uri)


@pytest.mark.s3
def test_s3_aborted_multipart_leaves_no_upload(s3_bucket):
    uri = s3_bucket + "/big/partial.bin"
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as f:
            f.write(os.urandom(storage.S3_PART_SIZE + 10))  # first part already uploaded
            raise RuntimeError("killed")
    bucket, _ = storage.split_s3(uri)
    assert not storage.exists(uri)
    uploads = storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == []


def test_join_and_split():
    assert storage.join("s3://b/x/", "y", "/z.txt") == "s3://b/x/y/z.txt"
    assert storage.split_s3("s3://bucket/a/b") == ("bucket", "a/b")
    with pytest.raises(storage.StorageError):
        storage.split_s3("/local/path")
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
