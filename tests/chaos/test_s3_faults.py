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
        storage.reset_clients()
        bucket = f"chaos{time.time_ns()}"
        storage.s3_client().create_bucket(Bucket=bucket)
        yield proxy, f"s3://{bucket}"
        storage.reset_clients()


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
    """The demo corpus stage written to S3 while 17% of requests fail (500, late, dropped,
    or applied with the answer lost): the shards, their markers and the accounting equal a
    fault-free run's."""
    from pipeline_tasks.demo import corpus
    from pipeline_tasks.demo import recipes as demo_recipes
    from pipeline_tasks.runtime import markers

    proxy, root = faulty_s3
    c = demo_recipes.cpu_test().replace(stamps_dir=str(picture_folder), pairs=40, shard_size=10)
    calm = f"{root}/calm/raw"
    corpus.build_corpus(c, calm, tiny_kb, progress=False).raise_if_failed()
    for kind in ("500", "drop", "lost"):
        proxy.add(kind=kind, times=0, probability=0.05)
    proxy.add(kind="slow", times=0, probability=0.02, delay_s=3.0)
    flaky = f"{root}/flaky/raw"
    res = corpus.build_corpus(c, flaky, tiny_kb, progress=False)
    fired = {r.kind: r.fired for r in proxy.rules}
    applied = [s for r in proxy.rules for s in r.applied]
    proxy.clear()
    res.raise_if_failed()
    assert all(fired.values()) and any(200 <= s < 300 for s in applied), (fired, applied)
    for name in [f"{i:05d}.{ext}" for i in range(4) for ext in ("tar", "parquet")]:
        assert storage.read_bytes(f"{calm}/{name}") == storage.read_bytes(f"{flaky}/{name}"), name
    store = markers.MarkerStore(flaky, "corpus")
    assert markers.verify_done(store, [f"{i:05d}" for i in range(4)], deep=True) == dict.fromkeys(
        [f"{i:05d}" for i in range(4)]
    )
    assert _pending_uploads(root) == []


# ------------------------------------------------------------------ the lost answer
# The server applied the request, the connection dropped before its answer arrived, and
# boto3 retried: each test first proves the write landed (the proxy saw the server's 2xx
# for the request whose answer it dropped, and boto3 sent it again), then what comes back.


def _lost(proxy, method: str, path_has: str = "", header: str = ""):
    return proxy.add(kind="lost", method=method, path_has=path_has, header=header, times=1)


def _proved(rule, proxy_requests_before: int, proxy) -> None:
    assert rule.fired == 1 and rule.applied and 200 <= rule.applied[0] < 300, rule.applied
    assert proxy.requests >= proxy_requests_before + 2  # the request and boto3's retry


def test_a_lease_whose_conditional_put_answer_was_lost_is_ours(faulty_s3):
    from training.core.lease import Lease

    proxy, root = faulty_s3
    uri = f"{root}/stage/_lease.json"
    rule = _lost(proxy, "PUT", "_lease.json")
    before = proxy.requests
    lease = Lease(uri, what="lost-answer test").acquire()
    _proved(rule, before, proxy)
    assert lease.held and lease.read()["token"] == lease.token
    lease.release()
    assert not storage.exists(uri)


def test_a_claim_whose_answer_was_lost_is_ours_and_the_shard_runs_once(faulty_s3):
    from pipeline_tasks.runtime import markers

    proxy, root = faulty_s3
    store = markers.MarkerStore(root, "score")
    rule = _lost(proxy, "PUT", "00003.running.json")
    before = proxy.requests
    rec = store.claim("00003")
    _proved(rule, before, proxy)
    assert rec is not None and storage.read_json(store._uri("00003", "running")) == rec
    store.mark_done("00003", markers.ShardStats())
    assert store.is_done("00003") and not storage.exists(store._uri("00003", "running"))


def test_a_stale_claim_taken_over_with_a_lost_answer_is_ours(faulty_s3):
    from pipeline_tasks.runtime import markers

    proxy, root = faulty_s3
    store = markers.MarkerStore(root, "score")
    dead = {"shard": "00001", "host": "gone-host", "pid": 1, "proc_start": 1,
            "started_at": 0.0, "heartbeat_at": 0.0, "token": "dead-writer"}  # fmt: skip
    storage.write_json(store._uri("00001", "running"), dead)
    rule = _lost(proxy, "PUT", "00001.running.json", header="If-Match")  # the replacement
    before = proxy.requests
    rec = store.claim("00001")
    _proved(rule, before, proxy)
    assert storage.read_json(store._uri("00001", "running"))["token"] == rec["token"]


def test_a_multipart_completion_whose_answer_was_lost_is_published(faulty_s3):
    proxy, root = faulty_s3
    data = os.urandom(storage.S3_PART_SIZE + 999)
    uri = f"{root}/lost/shard.tar"
    rule = _lost(proxy, "POST", "uploadId=")
    before = proxy.requests
    storage.write_bytes(uri, data)
    _proved(rule, before, proxy)
    assert storage.read_bytes(uri) == data and _pending_uploads(root) == []


def test_a_lost_completion_whose_retry_finds_no_upload_is_published(faulty_s3):
    """AWS forgets a completed upload: the retry of a completion whose answer was lost gets
    404 NoSuchUpload (moto still accepts it; the proxy answers as AWS does)."""
    proxy, root = faulty_s3
    data = os.urandom(storage.S3_PART_SIZE + 999)
    uri = f"{root}/lost/forgotten.tar"
    lost = _lost(proxy, "POST", "uploadId=")
    gone = proxy.add(kind="error", method="POST", path_has="uploadId=", times=1,
                     status=404, code="NoSuchUpload")  # fmt: skip
    before = proxy.requests
    storage.write_bytes(uri, data)
    _proved(lost, before, proxy)
    assert gone.fired == 1 and storage.read_bytes(uri) == data


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_a_plain_put_or_delete_whose_answer_was_lost_is_done_once(faulty_s3, method):
    proxy, root = faulty_s3
    uri = f"{root}/plain/marker.json"
    if method == "DELETE":
        storage.write_json(uri, {"a": 1})
    rule = _lost(proxy, method, "marker.json")
    before = proxy.requests
    if method == "PUT":
        storage.write_json(uri, {"a": 2})
    else:
        storage.delete(uri)
    _proved(rule, before, proxy)
    assert (storage.read_json(uri) == {"a": 2}) if method == "PUT" else not storage.exists(uri)
