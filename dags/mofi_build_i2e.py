"""Build an I2E dataset version from raw shards: check -> reuse source -> ner -> score (mapped)
-> vocab -> write -> publish -> report.

Wiring only: each task launches one `mofi` command in its own process (spark-submit for ner
and vocab, scoring workers for score) or calls one library function, so no heavy compute
runs inside the Airflow worker. The stages are chained in ``runtime.layout.BUILD_STAGES``
order, the list `mofi build-i2e` and `mofi status` use too.

* Outputs: ``ROOT/v=VERSION/i2e_run`` (work files) and ``ROOT/v=VERSION/i2e`` (the shards);
  VERSION is ``params.version`` or the run's date (``runtime.layout.VersionLayout``).
* Params ``root``, ``raw`` and ``kb`` default to the deployment's ``MOFI_ROOT``, ``MOFI_RAW``
  and ``MOFI_KB``; without them a trigger must give them.
* Spark: ner and vocab are submitted to the master of the Airflow connection
  ``spark_default`` (``local[*]``, ``spark://``, ``yarn`` or ``k8s://``: set
  ``AIRFLOW_CONN_SPARK_DEFAULT``, no code change).
* Scoring: ``prepare_score`` bootstraps the packaged scorer once per version when it is
  missing and embeds every entity text once; then one mapped ``score`` task per batch of
  ``params.score_batch_shards`` shards (at most 1024 batches) runs in the ``gpu`` pool, whose
  slots are the devices. A failed batch is retried; if it still fails, the other batches
  finish, ``report`` fails naming the failed shards, and clearing that one task after a fix
  completes the version without redoing the rest.
* Every stage skips the shards whose done marker exists and matches its files, so a retried
  or cleared task resumes. ``publish`` updates the ``mofi_i2e`` asset with the version's URI:
  the training DAG is scheduled on it.
* Incremental: ``reuse_source`` picks the earlier version (``params.reuse_from``: by default
  the last one published on ``mofi_i2e``; ``none`` forces a full rebuild). ner and score copy
  every shard whose reuse key (raw content, KB, config, scorer, code) is unchanged and
  compute only the rest; the packaged scorer is kept unless ``params.retrain_scorer``;
  vocab and write run over the whole version (``pipeline_tasks.runtime.reuse``).
* Schedule: ``MOFI_BUILD_SCHEDULE`` (cron or preset, read from the environment; none by
  default: triggered). Retries: ``MOFI_TASK_RETRIES`` (2), first delay
  ``MOFI_RETRY_DELAY_S`` (60 s), doubling.
"""

from __future__ import annotations

import os
import shlex
import sys
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, task

from pipeline_tasks import recipes
from pipeline_tasks.orchestration import dag_tasks
from pipeline_tasks.orchestration.dag_tasks import env_param
from pipeline_tasks.runtime.layout import BUILD_STAGES, HYGIENE, NER, SCORE, VOCAB, WRITE

MOFI = f"{shlex.quote(sys.executable)} -m pipeline_tasks.cli"
VERSION = "build_version(params, dag_run)"
VERSION_ROOT = "{{ " + VERSION + ".root }}"
RUN = "{{ " + VERSION + ".run.root }}"
I2E = "{{ " + VERSION + ".i2e.root }}"
COMMON = "--config {{ params.config }} --no-progress"
INPUTS = "--raw {{ params.raw }} --kb {{ params.kb }}"
SPARK = "{{ spark_args('spark_default') }}"
SCORE_MODEL = "{% if params.score_model %} --model {{ params.score_model }}{% endif %}"
I2E_ASSET = Asset("mofi_i2e")

DEFAULT_ARGS = dag_tasks.default_args(owner="mofi-data", hours=6)


@dag(
    dag_id="mofi_build_i2e",
    schedule=os.environ.get("MOFI_BUILD_SCHEDULE") or None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    user_defined_macros={
        "spark_args": dag_tasks.spark_args,
        "eval_folder_args": dag_tasks.eval_folder_args,
        "build_version": dag_tasks.build_version,
    },
    tags=["mofi", "data"],
    params={
        "root": env_param(
            "MOFI_ROOT",
            "output root (local path or s3://); versions go to ROOT/v=VERSION",
            type="string",
            minLength=1,
        ),
        "raw": env_param("MOFI_RAW", "raw shards (img2dataset layout)", type="string", minLength=1),
        "kb": env_param("MOFI_KB", "knowledge base root", type="string", minLength=1),
        "config": Param(
            os.environ.get("MOFI_BUILD_CONFIG", "production"),
            enum=list(recipes.RECIPES),
            description="named pipeline config (mofi config list)",
        ),
        "version": Param(
            "",
            type="string",
            pattern="^[A-Za-z0-9._-]*$",
            description="version name (empty: the run's date)",
        ),
        "score_model": Param(
            "",
            type="string",
            description="scorer override: open_clip ARCH[:TAG_OR_PATH] or a checkpoint URI (empty: the config's)",
        ),
        "threshold": Param(
            None,
            type=["null", "number"],
            minimum=-1,
            maximum=1,
            description="vocab similarity threshold override (empty: the config's)",
        ),
        "reuse_from": Param(
            "latest",
            type="string",
            minLength=1,
            description="incremental rebuild: copy each unchanged shard of ner and score from "
            "this earlier version: latest (the last one published on mofi_i2e), a version name "
            "under root, a version URI, or none (a full rebuild)",
        ),
        "eval_folders": Param(
            dag_tasks.eval_folders(os.environ.get("MOFI_EVAL_FOLDERS", "")),
            type="array",
            items={"type": "string", "minLength": 1},
            description="evaluation folders (GPR1200 layout) whose copies the hygiene stage "
            "drops (empty: the config's; default: $MOFI_EVAL_FOLDERS, comma-separated)",
        ),
        "retrain_scorer": Param(
            False,
            type="boolean",
            description="bootstrap a new packaged scorer instead of keeping the reused version's "
            "(every shard is then scored again)",
        ),
        # 87: a task's fixed cost (Airflow 0.26 s at 1,024 mapped tasks + a score worker's
        # 9.3 s start-up at 2M entities) is 10 % of a task scoring 10,000-pair shards at
        # 10,000 images/s (tests/benchmarks/bench_map_size.py; README "Scale")
        "score_batch_shards": Param(
            87,
            type="integer",
            minimum=1,
            description="raw shards per mapped scoring task (grows so that at most 1024 tasks are mapped)",
        ),
    },
    doc_md=__doc__,
)
def mofi_build_i2e():
    @task
    def check_params(params=None) -> dict:
        """Inputs exist, the output root is writable, the config is known: before any work."""
        return dag_tasks.check_build_params(params)

    @task(inlets=[I2E_ASSET])
    def reuse_source(params=None, dag_run=None, *, inlet_events=None) -> str:
        """The earlier version whose unchanged shards this build copies ("none": all anew)."""
        events = list(inlet_events[I2E_ASSET]) if inlet_events is not None else []
        return dag_tasks.reuse_source(params, dag_tasks.build_version(params, dag_run), events)

    @task.bash(execution_timeout=timedelta(hours=12))
    def ner(reuse: str) -> str:
        return f"{MOFI} ner {INPUTS} --run {RUN} {COMMON} {SPARK} --reuse-from {shlex.quote(reuse)}"

    @task.bash(execution_timeout=timedelta(hours=2))
    def prepare_score(reuse: str) -> str:
        retrain = "{% if params.retrain_scorer %} --retrain-scorer{% endif %}"
        return (
            f"{MOFI} score {INPUTS} --run {RUN} {COMMON} --bootstrap-if-missing --prepare"
            f"{SCORE_MODEL} --reuse-from {shlex.quote(reuse)}{retrain}"
        )

    @task
    def score_batches(run_uri: str, batch_shards: str) -> list[str]:
        """The scoring plan in batches: one mapped score task each."""
        return dag_tasks.shard_batches(run_uri, int(batch_shards))

    @task.bash(pool="gpu", queue="gpu", execution_timeout=timedelta(hours=12))
    def score(shards: str, reuse: str) -> str:
        return (
            f"{MOFI} score {INPUTS} --run {RUN} {COMMON} --shards {shards}{SCORE_MODEL} "
            f"--reuse-from {shlex.quote(reuse)}"
        )

    @task.bash(execution_timeout=timedelta(hours=6))
    def hygiene() -> str:
        folders = "{{ eval_folder_args(params.eval_folders) }}"
        return f"{MOFI} hygiene --run {RUN} {COMMON} {SPARK}{folders}"

    @task.bash(execution_timeout=timedelta(hours=6))
    def vocab() -> str:
        threshold = (
            "{% if params.threshold is not none %} --threshold {{ params.threshold }}{% endif %}"
        )
        return f"{MOFI} vocab --kb {{{{ params.kb }}}} --run {RUN} {COMMON} {SPARK}{threshold}"

    @task.bash(execution_timeout=timedelta(hours=12))
    def write() -> str:
        return f"{MOFI} write --raw {{{{ params.raw }}}} --run {RUN} --out {I2E} {COMMON}"

    @task(outlets=[I2E_ASSET])
    def publish(i2e_uri: str, *, outlet_events=None) -> str:
        """Records the version's URI in the asset event (the train DAG reads it)."""
        from pipeline_tasks.orchestration.assets import asset_extra

        outlet_events[I2E_ASSET].extra = asset_extra(i2e_uri)
        return i2e_uri

    @task(trigger_rule="all_done")
    def report(version_root: str) -> dict:
        """Shards done per stage; fails naming the failed shards when a stage has any."""
        return dag_tasks.build_report(version_root)

    source = reuse_source()
    prepare = prepare_score(source)
    batches = score_batches(RUN, "{{ params.score_batch_shards }}")
    prepare >> batches
    scored = score.partial(reuse=source).expand(shards=batches)
    ner_task, hygiene_task = ner(source), hygiene()
    vocab_task, write_task = vocab(), write()
    # each stage's first and last task, chained in the pipeline's one stage order
    stage_tasks = {
        NER: (ner_task, ner_task),
        SCORE: (prepare, scored),
        HYGIENE: (hygiene_task, hygiene_task),
        VOCAB: (vocab_task, vocab_task),
        WRITE: (write_task, write_task),
    }
    last = check_params()
    last >> source
    last = source
    for name in BUILD_STAGES:
        first, end = stage_tasks[name]
        last >> first
        last = end
    last >> publish(I2E) >> report(VERSION_ROOT)


mofi_build_i2e()
