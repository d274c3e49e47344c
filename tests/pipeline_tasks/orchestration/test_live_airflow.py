"""The real local Airflow: api-server, scheduler, dag-processor and triggerer as `make demo`
starts them. Over the REST API a build is triggered, the mofi_i2e asset triggers training,
ML ops trigger training with params, a scoring batch that fails costs only itself and is
cleared after the fix; every service is stopped at the end."""

from __future__ import annotations

import os
import shutil
import socket
import time

import psutil
import pytest

from pipeline_tasks.demo.layout import DemoLayout
from pipeline_tasks.orchestration.local_airflow import LocalAirflow
from pipeline_tasks.runtime import markers, status

pytestmark = pytest.mark.slow
BUILD, TRAIN = "mofi_build_i2e", "mofi_train"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def airflow(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("af_root")
    env = {
        **DemoLayout(str(root)).airflow_env([tiny_corpus["eval"]]),
        "MOFI_RAW": tiny_corpus["raw"],
        "MOFI_KB": tiny_corpus["kb"],
        "MOFI_BUILD_CONFIG": "cpu_test",
        "MOFI_TRAIN_CONFIG": "cpu_test",
        "MOFI_TASK_RETRIES": "1",
        "MOFI_RETRY_DELAY_S": "1",
    }
    af = LocalAirflow(str(root / "airflow"), _free_port(), extra_env=env)
    af.up()
    try:
        yield {"af": af, "root": str(root), "client": af.client(), "corpus": tiny_corpus}
    finally:
        pids = [r["pid"] for r in af.running().values()]
        procs = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                procs += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        af.down()
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, f"Airflow processes left running: {alive}"


def _ti_states(client, dag_id, run_id):
    return {(t["task_id"], t["map_index"]): t for t in client.task_instances(dag_id, run_id)}


def test_up_again_reuses_the_running_services(airflow):
    af = airflow["af"]
    before = af.running()
    again = LocalAirflow(af.home, af.port, extra_env=af.extra_env).up()
    assert again["reused"] and af.running() == before  # detected, not duplicated
    st = af.status()
    assert st["healthy"] and st["running"] == sorted(before)


def test_build_over_rest_triggers_training_through_the_asset(airflow):
    client = airflow["client"]
    client.wait_for_dags([BUILD, TRAIN])
    client.set_paused(BUILD, False)
    client.set_paused(TRAIN, False)
    t0 = time.time()
    conf = {"config": "cpu_test", "version": "live", "score_batch_shards": 2, "threshold": -1.0}
    run = client.trigger(BUILD, conf)
    done = client.wait(BUILD, run["dag_run_id"], timeout_s=900, poll_s=2)
    assert done["state"] == "success", _ti_states(client, BUILD, run["dag_run_id"])
    version = os.path.join(airflow["root"], "v=live")
    stages = {s["stage"]: s for s in status.summarize_run(version)}
    assert stages["score"]["complete"] and stages["write"]["complete"]
    tis = _ti_states(client, BUILD, run["dag_run_id"])
    assert len([k for k in tis if k[0] == "score"]) == 2  # 4 shards in batches of 2
    # the asset event of `publish` starts the training DAG on this version
    deadline = time.time() + 120
    train = None
    while train is None and time.time() < deadline:
        train = next((r for r in client.runs(TRAIN) if r["run_type"] == "asset_triggered"), None)
        time.sleep(2)
    assert train is not None, "the mofi_i2e asset did not trigger mofi_train"
    done = client.wait(TRAIN, train["dag_run_id"], timeout_s=900, poll_s=2)
    assert done["state"] == "success", _ti_states(client, TRAIN, train["dag_run_id"])
    assert time.time() - t0 < 900
    from evaluation.results import read_results

    rows = read_results(f"sqlite:///{airflow['root']}/results.sqlite")
    assert {r["run_id"] for r in rows} >= {train["dag_run_id"], train["dag_run_id"] + "/packaged"}
    airflow["version"] = version


def test_ml_ops_trigger_training_over_rest_with_params(airflow):
    client = airflow["client"]
    i2e = os.path.join(airflow["version"], "i2e")
    run = client.trigger(
        TRAIN,
        {"i2e": i2e, "config": "cpu_test", "nnodes": 1, "nproc_per_node": 1, "baseline": False},
    )
    done = client.wait(TRAIN, run["dag_run_id"], timeout_s=900, poll_s=2)
    assert done["state"] == "success", _ti_states(client, TRAIN, run["dag_run_id"])
    out = os.path.join(
        airflow["root"], "train", run["dag_run_id"].replace(":", "_").replace("+", "_")
    )
    cfg = open(os.path.join(out, "train.request.json")).read()
    assert '"nproc_per_node": 1' in cfg and '"name": "cpu_test"' in cfg


def test_a_failed_scoring_batch_costs_only_itself(airflow):
    client, version = airflow["client"], airflow["version"]
    client.set_paused(TRAIN, True)  # no new training run from this version's next publish
    build_run = next(r for r in client.runs(BUILD) if r["conf"].get("version") == "live")
    run_id = build_run["dag_run_id"]
    before = _ti_states(client, BUILD, run_id)
    (idx,) = [k[1] for k in before if k[0] == "score" and k[1] == 1]
    # shard 00002 (batch 1) must be scored again and its raw tar is gone
    work = os.path.join(version, "i2e_run")
    store = markers.MarkerStore(os.path.join(work, "score"), "score")
    os.remove(os.path.join(work, "score", "00002.parquet"))
    raw_tar = os.path.join(airflow["corpus"]["raw"], "00002.tar")
    saved = raw_tar + ".saved"
    shutil.move(raw_tar, saved)
    other_done = store.read_all()["00000"]["stats"]["finished_at"]
    try:
        client.clear(BUILD, run_id, [["score", idx]])
        done = client.wait(BUILD, run_id, timeout_s=600, poll_s=2)
        assert done["state"] == "failed"
        tis = _ti_states(client, BUILD, run_id)
        assert tis[("score", idx)]["state"] == "failed"
        assert (
            tis[("score", idx)]["try_number"] >= before[("score", idx)]["try_number"] + 2
        )  # retried
        assert tis[("score", 0)]["try_number"] == before[("score", 0)]["try_number"]  # untouched
        assert tis[("report", -1)]["state"] == "failed"
        (score,) = [s for s in status.summarize_run(version) if s["stage"] == "score"]
        assert list(score["failed_shards"]) == ["00002"]
        assert "00002.tar" in score["failed_shards"]["00002"]
    finally:
        shutil.move(saved, raw_tar)
    # the fix is in: clearing that one task completes the version, the rest is kept
    client.clear(BUILD, run_id, [["score", idx]])
    done = client.wait(BUILD, run_id, timeout_s=600, poll_s=2)
    assert done["state"] == "success"
    tis = _ti_states(client, BUILD, run_id)
    assert tis[("score", 0)]["try_number"] == before[("score", 0)]["try_number"]
    assert store.read_all()["00000"]["stats"]["finished_at"] == other_done  # not redone
    assert store.is_complete("00002")
