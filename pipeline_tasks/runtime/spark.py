"""Spark stages: the launcher and the one stage runner.

Every Spark stage (ner, vocab) runs through :func:`run_spark_stage` (pending shards, submit,
failed shards: the same contract as the local executor's), which submits with
:func:`run_spark_job`: the driver writes the job's spec, launches ``spark-submit SCRIPT
SPEC`` (``local[*]`` by default; ``spark://``, ``yarn`` or ``k8s://`` for a cluster, where the
executors run the project's image) and shows a progress bar fed by the stage's done markers,
which the executors write.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from training.core import config as cfg
from training.core import tempfiles
from training.core.process import die_with_parent

from . import markers
from .executor import ShardTask, StageResult, collect_failures, pending_tasks

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SparkConfig(cfg.StageConfig):
    """Where and how a Spark job runs."""

    master: str = cfg.field(
        "local[*]", "Spark master: local[N], local[*], spark://host:7077, yarn, k8s://https://..."
    )
    driver_memory: str = cfg.field("2g", "spark.driver.memory")
    executor_memory: str = cfg.field("2g", "spark.executor.memory (cluster masters)")
    partitions: int = cfg.field(
        0, "tasks for the per-shard work (0: two per core, at most one per shard)"
    )
    extra_conf: dict[str, str] = cfg.field(
        factory=dict, doc="more --conf key=value pairs for spark-submit"
    )
    deploy_mode: str = cfg.field("client", "client or cluster")

    def validate(self) -> None:
        ok = self.master.startswith(("local", "spark://", "yarn", "k8s://", "mesos://"))
        self._check(ok, "master", "use local[N], local[*], spark://..., yarn or k8s://...")
        self._check(self.partitions >= 0, "partitions", "must be >= 0")
        self._check(self.deploy_mode in ("client", "cluster"), "deploy_mode", "client or cluster")


def spark_submit_path() -> str:
    import pyspark

    path = os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"spark-submit not found at {path}: is pyspark 4.3.0 installed (make setup)?"
        )
    return path


def spark_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # The job imports pipeline_tasks; make sure it resolves to this checkout.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def local_jvm_conf(master: str) -> dict[str, str]:
    """A local master's JVM is the whole cluster on a shared machine: the serial collector
    grows its heap only as far as the live data needs (G1, the default on 2+ cores, grew
    vocab's JVM from 0.79 to 1.70 GiB between 1,000 and 8,000 pairs; serial 0.57 to 0.78,
    with Arrow batches of 1,000 rows), and execution memory comes in 2 MB pages, not the
    up to 64 MB that Spark sizes from the heap (vocab's JVM at 8,000 pairs: 0.71 -> 0.66 GiB).
    A cluster's JVMs keep Spark's defaults."""
    if not master.startswith("local"):
        return {}
    return {"spark.driver.defaultJavaOptions": "-XX:+UseSerialGC", "spark.buffer.pageSize": "2m"}


def run_spark_job(
    script: str,
    spec: dict[str, Any],
    sc: SparkConfig,
    name: str,
    store: markers.MarkerStore,
    shards: list[str],
    progress: bool,
    work_dir: str,
    extra_stores: list[tuple[markers.MarkerStore, list[str]]] = (),
) -> None:
    """spark-submit ``script`` with ``spec``; a progress bar counts ``store``'s done markers.

    Everything the job leaves on local disk (its spec, its log, Spark's scratch and the Python
    workers' temp files) lives in ``work_dir/spark-NAME``, emptied at the next launch. If the
    job dies, every shard of ``shards`` (and of ``extra_stores``) it did not finish gets a
    failed marker naming the exit code and the log."""
    from tqdm import tqdm

    job_dir = os.path.join(work_dir, f"spark-{name}")
    shutil.rmtree(job_dir, ignore_errors=True)  # the last launch's leftovers (we hold the stage)
    scratch = os.path.join(job_dir, "scratch")
    tmp = os.path.join(job_dir, "tmp")
    os.makedirs(scratch)
    os.makedirs(tmp)
    spec_path = os.path.join(job_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    log_path = os.path.join(job_dir, "job.log")
    total = len(shards)
    cmd = [
        spark_submit_path(),
        "--master",
        sc.master,
        "--deploy-mode",
        sc.deploy_mode,
        "--name",
        f"mofi-{name}",
    ]
    conf = {
        "spark.driver.memory": sc.driver_memory,
        "spark.executor.memory": sc.executor_memory,
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.python.worker.reuse": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.shuffle.partitions": str(max(1, min(200, total))),
        "spark.sql.adaptive.enabled": "false",
        "spark.task.maxFailures": "2",
        "spark.local.dir": scratch,
        "spark.driver.extraJavaOptions": f"-Djava.io.tmpdir={tmp}",
        **local_jvm_conf(sc.master),
        **sc.extra_conf,
    }
    for k, v in conf.items():
        cmd += ["--conf", f"{k}={v}"]
    cmd += [script, spec_path]
    log.info("launching %s", " ".join(cmd))
    bar = tqdm(total=total, unit="shard", desc=name, disable=not progress, dynamic_ncols=True)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(2.0):
            done = sum(1 for r in store.read_all().values() if r["state"] in ("done", "failed"))
            bar.n = min(total, done)
            bar.refresh()

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    env = {**spark_env(), "TMPDIR": tmp}
    try:
        with open(log_path, "w") as logf:
            proc = subprocess.run(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
            )
    finally:
        stop.set()
        th.join()
        bar.close()
    if proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            tail = "".join(f.readlines()[-40:])
        error = f"spark job {name} failed (exit {proc.returncode}); full log: {log_path}"
        for st, ids in [(store, shards), *extra_stores]:
            recs = st.read_all()
            for sid in ids:  # a failure the job recorded itself keeps its own message
                if recs.get(sid, {}).get("state") not in ("done", "failed"):
                    st.mark_failed(sid, error, markers.ShardStats())
        raise RuntimeError(f"{error}\n{tail}")
    shutil.rmtree(job_dir, ignore_errors=True)


def run_spark_stage(
    script: str,
    sc: SparkConfig,
    name: str,
    stores: list[tuple[markers.MarkerStore, list[ShardTask]]],
    make_spec: Callable[[list[list[ShardTask]]], dict[str, Any]],
    result: StageResult,
    work_dir: str,
    progress: bool = True,
    whole: bool = False,
    adopt: Callable[[list[ShardTask]], list[ShardTask]] | None = None,
) -> StageResult:
    """The one lifecycle of a Spark stage (ner, vocab), whose plan the caller has written:

    1. pending shards: those without a done marker that matches their files, per store (the
       first store's shards drive the progress bar; a stage may write several, like vocab's
       vocabulary and labels); ``whole``: the job computes every shard at once, so any pending
       shard withdraws every done marker and the job redoes them all;
    2. submit: ``spark-submit SCRIPT`` with ``make_spec(pending shards per store)``, after the
       temporary files of dead writers are cleaned from each store's folder;
    3. failed shards: every shard still not done is failed, with its marker's error, in
       ``result`` (``executor.collect_failures``). A job that dies raises after marking the
       shards it did not finish.

    ``adopt``: takes the first store's pending tasks and returns those still to compute
    (an incremental rebuild copies the others from an earlier version: ``runtime.reuse``)."""
    todos = [pending_tasks(store, tasks, result) for store, tasks in stores]
    if adopt is not None:
        todos[0] = adopt(todos[0])
    if whole and any(todos):
        for store, tasks in stores:
            for t in tasks:
                store.unmark_done(t.shard)
        todos = [list(tasks) for _, tasks in stores]
    t0 = time.time()
    if any(todos):
        for store, _ in stores:
            tempfiles.clean_temp(store.root)
        (first, _), *rest = stores
        run_spark_job(
            script,
            make_spec(todos),
            sc,
            name,
            first,
            [t.shard for t in todos[0]],
            progress,
            work_dir,
            extra_stores=[
                (store, [t.shard for t in todo])
                for (store, _), todo in zip(rest, todos[1:], strict=True)
            ],
        )
    result.processed = len(todos[0])
    result.seconds = round(time.time() - t0, 2)
    for store, tasks in stores:
        collect_failures(store, [t.shard for t in tasks], result)
    return result
