"""The storage API on local disk and against a real moto S3 server (HTTP on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest

from training.core import exclusive, process, storage, tempfiles


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
        assert not any(tempfiles.TEMP_MARK in n for n in os.listdir(storage_root))


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
    storage.write_bytes(
        storage.join(storage_root, ".00003.tar" + tempfiles.TEMP_MARK + "abc"), b"x"
    )
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


def test_exclusive_create_publishes_once(storage_root):
    uri = storage.join(storage_root, "claims", "x.json")
    assert exclusive.create_exclusive(uri, b'{"a": 1}')
    assert not exclusive.create_exclusive(uri, b'{"a": 2}')
    assert storage.read_json(uri) == {"a": 1}
    # replace only what is still as we read it
    assert not exclusive.replace_if_unchanged(uri, {"a": 9}, b'{"a": 3}')
    assert exclusive.replace_if_unchanged(uri, {"a": 1}, b'{"a": 3}')
    assert storage.read_json(uri) == {"a": 3}
    assert storage.list_files(storage.join(storage_root, "claims")) == [uri]


def test_temp_names_carry_their_writer_and_only_dead_writers_are_cleaned(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    mine = tempfiles.temp_name_for(str(tmp_path / "a.tar"))
    assert tempfiles.temp_owner(mine) == {
        "host": host,
        "pid": os.getpid(),
        "proc_start": process.proc_start(),
    }
    theirs = tmp_path / f".b.tar{tempfiles.TEMP_MARK}{host}-{dead_pid}-abcdef012345"
    for p in (mine, theirs):
        open(p, "wb").close()
    assert tempfiles.clean_temp(str(tmp_path)) == 1  # the dead writer's file only
    assert os.path.exists(mine) and not theirs.exists()


def test_unwritable_output_is_named_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = str(tmp_path / "file" / "out")
            (tmp_path / "file").write_text("x")
        else:
            target = str(ro / "out")
        with pytest.raises(storage.StorageError, match="cannot write to " + target):
            storage.check_writable(target)
    finally:
        os.chmod(ro, 0o700)
    storage.check_writable(str(tmp_path / "fine"))
    assert os.listdir(tmp_path / "fine") == []


def test_unreachable_s3_endpoint_is_one_clear_error(monkeypatch):
    """Connection refused, after boto3's standard retries (AWS_MAX_ATTEMPTS honoured)."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage.reset_clients()
    try:
        t0 = time.time()
        for call in (
            lambda: storage.exists("s3://bucket/x"),
            lambda: storage.list_files("s3://bucket/prefix"),
            lambda: storage.write_bytes("s3://bucket/y", b"1"),
            lambda: storage.read_bytes("s3://bucket/z"),
        ):
            with pytest.raises(storage.StorageError) as err:
                call()
            msg = str(err.value)
            assert "\n" not in msg and "s3://bucket/" in msg and f"127.0.0.1:{port}" in msg
        assert time.time() - t0 < 60
        assert storage.s3_client().meta.config.retries.get("total_max_attempts") in (None, 2)
    finally:
        storage.reset_clients()


def test_a_reused_pid_keeps_no_dead_writers_temp_files(tmp_path):
    """The temporary name carries the writer's start time: a file whose pid is alive but
    belongs to a later process (here: this one, with another start time) is a dead writer's,
    judged by the one liveness rule (process.is_dead)."""
    import socket

    host, me = socket.gethostname(), os.getpid()
    ours = tempfiles.temp_name_for(str(tmp_path / "a.tar"))
    stale = tmp_path / f".b.tar{tempfiles.TEMP_MARK}{host}-{me}-{process.proc_start() - 1}-abc"
    for p in (ours, stale):
        open(p, "wb").close()
    assert tempfiles.temp_owner(str(stale))["pid"] == me  # the pid alone says: alive
    assert tempfiles.clean_temp(str(tmp_path)) == 1
    assert os.path.exists(ours) and not stale.exists()


def test_a_new_client_reads_the_credentials_the_environment_has_now(monkeypatch):
    """A process that points at another S3 server (new endpoint and keys, then
    ``reset_clients()``) must sign with the new keys: boto3's default session caches the
    first credentials it resolved, which once made the cluster run sign for moto's."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    storage.reset_clients()
    first = storage.s3_client()._request_signer._credentials.get_frozen_credentials()
    assert first.access_key == "first-key"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "second-secret")
    storage.reset_clients()
    second = storage.s3_client()._request_signer._credentials.get_frozen_credentials()
    storage.reset_clients()
    assert (second.access_key, second.secret_key) == ("second-key", "second-secret")


def test_a_client_created_during_a_reset_is_not_kept(monkeypatch):
    """A thread (a heartbeat left by an earlier claim) creating a client from an environment
    without keys while the main thread sets the keys and resets: the reset must not leave that
    client cached. Unlocked, the reset ran before the thread stored its keyless client, and
    the next ``s3_client()`` signed with none (CI: NoCredentialsError creating a bucket)."""
    import threading

    import boto3

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    storage.reset_clients()
    created, go = threading.Event(), threading.Event()
    real_client = boto3.session.Session.client

    def slow_client(self, *args, **kwargs):
        client = real_client(self, *args, **kwargs)  # keys resolved here, from the env now
        if threading.current_thread().name == "beat":
            created.set()
            go.wait(10)
        return client

    monkeypatch.setattr(boto3.session.Session, "client", slow_client)
    beat_client = []
    beat = threading.Thread(target=lambda: beat_client.append(storage.s3_client()), name="beat")
    beat.start()
    assert created.wait(10)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "now-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "now-secret")
    reset = threading.Thread(target=storage.reset_clients)
    reset.start()
    reset.join(0.5)
    go.set()
    beat.join(10)
    reset.join(10)
    try:
        assert beat_client[0]._request_signer._credentials is None  # the fault: a keyless one
        creds = storage.s3_client()._request_signer._credentials
        assert creds is not None and creds.get_frozen_credentials().access_key == "now-key"
    finally:
        storage.reset_clients()


def test_a_lease_whose_link_reported_failure_after_linking_is_ours(tmp_path, monkeypatch):
    """Over NFS a ``link`` can succeed on the server and fail on the client (the retried
    call finds the name taken). The writer reads back: its own file there is a win."""
    from training.core.lease import Lease

    real_link, made = os.link, []

    def link_then_lose_the_answer(src, dst):
        real_link(src, dst)
        made.append(dst)
        raise FileExistsError(17, "File exists", dst)

    monkeypatch.setattr(os, "link", link_then_lose_the_answer)
    uri = str(tmp_path / "_lease.json")
    lease = Lease(uri, what="nfs").acquire()
    monkeypatch.undo()
    assert made == [uri]  # the fault happened: the link was made, the call said it was not
    assert lease.held and lease.read()["token"] == lease.token
    lease.release()
    assert not os.path.exists(uri)


def test_input_checks_by_ranged_reads_on_local_and_s3(storage_root):
    """The input checks read the Parquet footer and the tar's first and last blocks through
    ``storage.read_range`` (a ranged GET on S3): a whole file passes, a truncated one is
    named."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.core.inputs import InputError, check_parquet, check_tar

    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["a"], "caption": ["b"]}), buf)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("a.txt")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    pq_uri, tar_uri = storage.join(storage_root, "s.parquet"), storage.join(storage_root, "s.tar")
    storage.write_bytes(pq_uri, buf.getvalue())
    storage.write_bytes(tar_uri, tar.getvalue())
    assert check_parquet(pq_uri, ("key", "caption")).names == ["key", "caption"]
    check_tar(tar_uri)
    assert storage.read_range(tar_uri, 512, 3) == b"abc"
    storage.write_bytes(pq_uri, buf.getvalue()[:-3])
    storage.write_bytes(tar_uri, tar.getvalue()[:1024])
    with pytest.raises(InputError, match="s.parquet is not Parquet or is truncated"):
        check_parquet(pq_uri)
    with pytest.raises(InputError, match="s.tar is truncated"):
        check_tar(tar_uri)
