"""Build an I2E dataset version from raw shards: ner -> score -> vocab -> write, then publish.

Wiring only: each task launches one `mofi` stage in its own process (spark-submit for ner
and vocab, scoring workers for score), so no heavy compute runs inside the Airflow worker.
Work files go to ROOT/v=<logical date>/i2e_run, shards to ROOT/v=<logical date>/i2e. Every
stage skips shards whose done marker exists, so clearing a failed task resumes it. The last
task updates the ``mofi_i2e`` asset with the version's URI; the training DAG is scheduled
on it.
"""

from __future__ import annotations

import shlex
import sys

import pendulum
from airflow.sdk import Asset, Param, dag, task

MOFI = f"{shlex.quote(sys.executable)} -m pipeline_tasks.cli"
VERSION_ROOT = "{{ params.root }}/v={{ ds }}"
RUN = f"{VERSION_ROOT}/i2e_run"
I2E = f"{VERSION_ROOT}/i2e"
COMMON = "--config {{ params.config }} --no-progress"
I2E_ASSET = Asset("mofi_i2e")


@dag(
    dag_id="mofi_build_i2e",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mofi", "data"],
    params={
        "root": Param(
            "runs/airflow", type="string", description="output root (local path or s3://)"
        ),
        "raw": Param("runs/demo/raw", type="string", description="raw shards (img2dataset layout)"),
        "kb": Param("runs/demo/kb", type="string", description="knowledge base root"),
        "config": Param(
            "demo",
            enum=["cpu_test", "demo", "production"],
            description="named config (mofi config list)",
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
    },
    doc_md=__doc__,
)
def mofi_build_i2e():
    @task.bash
    def ner() -> str:
        return (
            f"{MOFI} ner --raw {{{{ params.raw }}}} --kb {{{{ params.kb }}}} --run {RUN} {COMMON}"
        )

    @task.bash
    def score() -> str:
        # the packaged scorer is bootstrapped once per version when no checkpoint exists
        model = "{% if params.score_model %} --model {{ params.score_model }}{% endif %}"
        return (
            f"{MOFI} score --raw {{{{ params.raw }}}} --kb {{{{ params.kb }}}} --run {RUN} {COMMON}"
            f" --bootstrap-if-missing{model}"
        )

    @task.bash
    def vocab() -> str:
        threshold = (
            "{% if params.threshold is not none %} --threshold {{ params.threshold }}{% endif %}"
        )
        return f"{MOFI} vocab --kb {{{{ params.kb }}}} --run {RUN} {COMMON}{threshold}"

    @task.bash
    def write() -> str:
        return f"{MOFI} write --raw {{{{ params.raw }}}} --run {RUN} --out {I2E} {COMMON} && {MOFI} status {VERSION_ROOT}"

    @task(outlets=[I2E_ASSET])
    def publish(i2e_uri: str, *, outlet_events=None) -> str:
        """Records the version's URI in the asset event (the train DAG reads it)."""
        from pipeline_tasks.assets import asset_extra

        outlet_events[I2E_ASSET].extra = asset_extra(i2e_uri)
        return i2e_uri

    ner() >> score() >> vocab() >> write() >> publish(I2E)


mofi_build_i2e()
