"""`mofi ner`: the Spark job that finds and links entity mentions in raw captions.

The driver (this module, run by the CLI or an Airflow task) discovers raw shards, skips
those whose done marker exists, writes a job spec and launches
``spark-submit pipeline_tasks/spark_jobs/ner_job.py SPEC`` on the configured master
(``local[*]`` by default; ``spark://``, ``yarn`` or ``k8s://`` for a cluster, where the
executors run the project's image). It shows a progress bar fed by the done markers.

Output: ``RUN/ner/{shard}.parquet`` with ``key`` and ``mentions`` (text, label, start, end,
entity_id, link_score), only rows with at least one linked mention; markers in
``RUN/ner/_markers/ner``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from training.core import config as cfg
from training.core import markers, storage

from . import raw as raw_mod
from .linking import LinkerConfig

log = logging.getLogger(__name__)
STAGE = "ner"
JOB_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spark_jobs", "ner_job.py")


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


@dataclasses.dataclass
class NerConfig(cfg.StageConfig):
    """NER + entity linking over raw captions, as a Spark job."""

    spark: SparkConfig = cfg.field(factory=SparkConfig, doc="Spark settings")
    linker: LinkerConfig = cfg.field(factory=LinkerConfig, doc="mention finding and linking")


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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_spark_job(
    script: str,
    spec: dict[str, Any],
    sc: SparkConfig,
    name: str,
    store: markers.MarkerStore,
    total: int,
    progress: bool,
) -> None:
    """spark-submit ``script`` with ``spec``; a progress bar counts the stage's done markers."""
    from tqdm import tqdm

    fd, spec_path = tempfile.mkstemp(prefix=f"mofi-{name}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    log_fd, log_path = tempfile.mkstemp(prefix=f"mofi-{name}-", suffix=".log")
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
    try:
        with os.fdopen(log_fd, "w") as logf:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=spark_env())
    finally:
        stop.set()
        th.join()
        bar.close()
        os.remove(spec_path)
    if proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            tail = "".join(f.readlines()[-40:])
        raise RuntimeError(
            f"spark job {name} failed (exit {proc.returncode}); full log: {log_path}\n{tail}"
        )
    os.remove(log_path)


def run_ner(
    config: NerConfig, raw_uri: str, kb_uri: str, run_uri: str, progress: bool = True
) -> dict[str, Any]:
    from .kb import load_kb

    load_kb(kb_uri)  # fail before Spark starts if the KB is missing or malformed
    shards, problems = raw_mod.discover(raw_uri)
    out = storage.join(run_uri, STAGE)
    store = markers.MarkerStore(out, STAGE)
    store.write_plan([s.shard for s in shards], {"skipped": problems, "raw": raw_uri, "kb": kb_uri})
    config.save(out)
    todo = [s for s in shards if not store.is_done(s.shard)]
    t0 = time.time()
    if todo:
        spec = {
            "kb_uri": kb_uri,
            "out_uri": out,
            "shards": [[s.shard, s.parquet] for s in todo],
            "config": config.to_dict(),
            "partitions": config.spark.partitions,
        }
        storage.clean_temp(out)
        run_spark_job(JOB_SCRIPT, spec, config.spark, STAGE, store, len(todo), progress)
    recs = store.read_all()
    failed = {
        s.shard: recs[s.shard].get("error", "")
        for s in shards
        if recs.get(s.shard, {}).get("state") == "failed"
    }
    missing = [
        s.shard for s in shards if s.shard not in recs or recs[s.shard]["state"] == "running"
    ]
    return {
        "shards": len(shards),
        "processed": len(todo),
        "skipped_shards": problems,
        "failed": failed,
        "missing": missing,
        "seconds": round(time.time() - t0, 2),
        "out": out,
    }
