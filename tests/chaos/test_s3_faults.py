"""S3 faults between the pipeline and a real S3 server (moto, over HTTP, behind a proxy that
answers 500, answers late, or drops connections mid-upload): each is retried with backoff,
and nothing half-written is ever visible as published."""

from __future__ import annotations

import os
import time

import pytest
from s3_faults import FaultProxy

from training.core import storage

pytestmark = [pytest.mark.chaos, pytest.mark.s3]


@pytest.fixture
def faulty_s3(moto_server, monkeypatch):
    with FaultProxy(moto_server, seed=int(os.environ.get("MOFI_CHAOS_SEED", "0"))) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
        monkeypatch.setenv("MOFI_S3_READ_TIMEOUT", "2")
        storage._clients.clear()
        bucket = f"chaos{time.time_ns()}"
        storage.s3_client().create_bucket(Bucket=bucket)
        yield proxy, f"s3://{bucket}"
        storage._clients.clear()


def _pending_uploads(root: str) -> list:
    bucket, _ = storage.split_s3(root)
    return storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_500s_on_multipart_parts_are_retried(faulty_s3):
    proxy, root = faulty_s3
    data = os.urandom(storage.S3_PART_SIZE * 2 + 777)  # three parts
    rule = proxy.add(kind="500", method="PUT", path_has="partNumber=", times=3)
    uri = f"{root}/big/shard.tar"
    storage.write_bytes(uri, data)
    assert rule.fired == 3
    assert storage.read_bytes(uri) == data and _pending_uploads(root) == []


def test_slow_responses_time_out_and_are_retried(faulty_s3):
    proxy, root = faulty_s3
    uri = f"{root}/slow/markers.json"
    storage.write_json(uri, {"ok": 1})
    rule = proxy.add(kind="slow", method="GET", path_has="/slow/", delay_s=3.0, times=1)
    t0 = time.time()
    assert storage.read_json(uri) == {"ok": 1}
    assert rule.fired == 1 and time.time() - t0 >= 2.0  # the first answer came too late


def test_connections_dropped_mid_upload_are_retried(faulty_s3):
    proxy, root = faulty_s3
    data = os.urandom(storage.S3_PART_SIZE + 4242)
    rule = proxy.add(kind="drop", method="PUT", path_has="partNumber=", times=2)
    uri = f"{root}/dropped/shard.tar"
    storage.write_bytes(uri, data)
    assert rule.fired == 2 and storage.read_bytes(uri) == data


def test_a_write_that_keeps_failing_publishes_nothing(faulty_s3):
    proxy, root = faulty_s3
    uri = f"{root}/never/shard.tar"
    proxy.add(kind="500", method="POST", path_has="uploadId=", times=1000)  # the completion
    with pytest.raises(storage.StorageError) as err:
        storage.write_bytes(uri, os.urandom(storage.S3_PART_SIZE + 10))
    assert "\n" not in str(err.value) and uri in str(err.value)
    proxy.clear()
    assert not storage.exists(uri)  # never half-visible: not published at all
    assert _pending_uploads(root) == []  # and the parts were aborted
    assert storage.list_files(f"{root}/never") == []


def test_a_stage_on_flaky_s3_gives_the_bytes_of_a_calm_run(
    faulty_s3, tmp_path, picture_folder, tiny_kb
):
    """The demo corpus stage written to S3 while 10% of requests fail (500, late, dropped):
    the shards, their markers and the accounting equal a fault-free run's."""
    from pipeline_tasks.demo import corpus
    from pipeline_tasks.demo import recipes as demo_recipes
    from pipeline_tasks.runtime import markers

    proxy, root = faulty_s3
    c = demo_recipes.cpu_test().replace(stamps_dir=str(picture_folder), pairs=40, shard_size=10)
    calm = f"{root}/calm/raw"
    corpus.build_corpus(c, calm, tiny_kb, progress=False).raise_if_failed()
    for kind in ("500", "drop"):
        proxy.add(kind=kind, times=0, probability=0.05)
    proxy.add(kind="slow", times=0, probability=0.02, delay_s=3.0)
    flaky = f"{root}/flaky/raw"
    res = corpus.build_corpus(c, flaky, tiny_kb, progress=False)
    fired = sum(r.fired for r in proxy.rules)
    proxy.clear()
    res.raise_if_failed()
    assert fired > 0
    for name in [f"{i:05d}.{ext}" for i in range(4) for ext in ("tar", "parquet")]:
        assert storage.read_bytes(f"{calm}/{name}") == storage.read_bytes(f"{flaky}/{name}"), name
    store = markers.MarkerStore(flaky, "corpus")
    assert markers.verify_done(store, [f"{i:05d}" for i in range(4)], deep=True) == dict.fromkeys(
        [f"{i:05d}" for i in range(4)]
    )
    assert _pending_uploads(root) == []
