"""The deployment's shape, run for real on network-namespace hosts (needs root, as CI has):
Postgres, Redis, SeaweedFS, a Spark standalone cluster and Airflow with Celery from
docker/compose.yaml's own description, the pipeline across them, three faults."""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("mofi-c-")]


def test_cleanup_removes_what_an_interrupted_run_left(tmp_path):
    """A run killed before its trap ran leaves namespaces, a bridge and processes: the next
    run's first step removes them all."""
    from pipeline_tasks.cluster import hosts

    hosts.cleanup()
    hs = hosts.make_hosts(["head", "worker1"], str(tmp_path))
    hosts.up(hs, {"head": ["s3"]})
    p = hs[1].popen(["sleep", "600"])
    name = hs[1].run(["hostname"], capture_output=True, text=True).stdout.strip()
    ping = hs[1].run(["getent", "hosts", "s3"], capture_output=True, text=True).stdout
    assert name == "worker1" and ping.split()[0] == hs[0].address
    assert sorted(_namespaces()) == ["mofi-c-head", "mofi-c-worker1"] and hs[1].pids()
    # the run "dies" here; a later run cleans up first
    subprocess.run([sys.executable, "-c", "from pipeline_tasks.cluster import hosts; hosts.cleanup()"],
                   check=True)  # fmt: skip
    assert p.wait(timeout=30) == -9
    assert _namespaces() == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "mofi-c-" not in links
    assert not os.path.exists("/etc/netns/mofi-c-head")


def test_the_pipeline_runs_across_hosts_through_three_faults(
    tmp_path, picture_folder, tiny_kb_table
):
    from pipeline_tasks.cluster import scenario
    from training.core import storage

    settings = scenario.Settings(
        str(tmp_path / "cluster"),
        pairs=128,
        shard_size=16,
        stamps=str(picture_folder),
        kb_source=tiny_kb_table,
    )
    with mock.patch.dict(os.environ):  # the run points this process at its S3 server
        rep = scenario.run(settings)
    storage.reset_clients()
    assert {h["name"] for h in rep["hosts"]} == {"head", "worker1", "worker2"}
    assert len({h["address"] for h in rep["hosts"]}) == 3
    # Spark's own record: executors on both worker hosts finished ner and vocab tasks
    assert rep["spark_executor_hosts"]["mofi-ner"] == ["worker1", "worker2"]
    assert rep["spark_executor_hosts"]["mofi-vocab"] == ["worker1", "worker2"]
    ok = [t for t in rep["task_hosts"] if t["state"] == "success"]
    assert {t["hostname"] for t in ok if t["task"] == "score"} == {"worker2"}
    assert sorted(t["hostname"] for t in ok if t["task"] == "train") == ["worker1", "worker2"]
    assert not any(t["hostname"] == "head" for t in rep["task_hosts"])
    # nothing a host wrote locally was needed: removed before training, which still ran
    assert rep["wiped_before_training"]["head"] == []
    ner, score, train = rep["faults"]
    assert (
        ner["killed_pids"] > 0 and ner["processes_left"] == 0 and ner["host"] != ner["driver_host"]
    )
    # Spark lost the killed host's executor, failed its running task there, ran it elsewhere
    assert "ExecutorLostFailure" in ner["killed_host_task_outcomes"] and ner["executors_lost"]
    assert ner["driver_host"] in ner["succeeded_on"]
    assert score["claim_still_there"] and score["processes_left"] == 0
    assert score["claim_holder"]["host"] == "worker2"
    assert score["after"] == {
        "claimed_shard_done_by": "worker2",
        "every_shard_done_once": True,
        "done_before_kept": True,
    }
    assert train["checkpoints_before"] and train["all_ranks_gone_after_s"] is not None
    steps = {int(c[len("step_") : -len(".pt")]) for c in train["checkpoints_before"]}
    resumed = dict(r.split(": step ") for r in train["resumed"])
    assert set(resumed) == {"worker1", "worker2"} and {int(v) for v in resumed.values()} <= steps
    assert rep["i2e_identical"] and rep["i2e_files"] > 2
    assert rep["curve_identical"] and rep["model_identical"] and rep["curve_steps"] > 4
    assert rep["results_rows"] >= 1
    assert rep["status_all_complete"] and rep["dashboard_all_complete"]
    assert set(rep["stage_seconds"]) == {"ner", "score", "hygiene", "vocab", "write"}
    assert all(rep["peak_rss_bytes"][h] > 0 for h in ("head", "worker1", "worker2"))
    assert _namespaces() == []
