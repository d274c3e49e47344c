"""The demo's input as a DAG: the knowledge base and the demo corpus for one version, then
shard status. A user of the system, not part of it: it lives with the demo, and the local
Airflow of `make demo` loads it as a second DAG bundle beside ``dags/``.

Wiring only: each task launches the `mofi` command in its own process, so no heavy
compute runs inside the Airflow worker. Outputs are partitioned by the run's logical date:
ROOT/v=YYYY-MM-DD/{kb,raw,truth,eval}. Re-running a date resumes: finished shards keep
their done markers and are skipped.
"""

from __future__ import annotations

import shlex
import sys

import pendulum
from airflow.sdk import Param, dag, task

from pipeline_tasks.demo import recipes
from pipeline_tasks.orchestration import dag_tasks

# The interpreter that parses this file is the project's virtualenv (or the image's).
MOFI = f"{shlex.quote(sys.executable)} -m pipeline_tasks.cli"
VERSION_ROOT = "{{ build_version(params, dag_run).root }}"


@dag(
    dag_id="mofi_corpus",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=dag_tasks.default_args(owner="mofi-data", hours=6),
    user_defined_macros={"build_version": dag_tasks.build_version},
    tags=["mofi", "data"],
    params={
        "root": Param(
            "runs/airflow",
            type="string",
            description="run root (local path or s3://); outputs go to ROOT/v=<logical date>",
        ),
        "config": Param(
            "demo",
            enum=list(recipes.RECIPES),
            description="named config (mofi config list)",
        ),
        "pairs": Param(
            5000, type="integer", minimum=1, description="image/alt-text pairs to write"
        ),
        "seed": Param(0, type="integer", description="corpus seed"),
        "stamps": Param(
            "",
            type="string",
            description="picture + caption folder (empty: the cached tuxpaint stamps)",
        ),
    },
    doc_md=__doc__,
)
def mofi_corpus():
    @task.bash
    def build_kb() -> str:
        return f"{MOFI} kb --config {{{{ params.config }}}} --out {VERSION_ROOT}/kb"

    @task.bash
    def build_corpus() -> str:
        stamps = "{% if params.stamps %}--stamps {{ params.stamps }}{% endif %}"
        return (
            f"{MOFI} corpus --config {{{{ params.config }}}} --out {VERSION_ROOT}/raw --kb {VERSION_ROOT}/kb "
            f"--pairs {{{{ params.pairs }}}} --seed {{{{ params.seed }}}} --no-progress {stamps}"
        )

    @task.bash
    def report_status() -> str:
        return f"{MOFI} status {VERSION_ROOT}"

    build_kb() >> build_corpus() >> report_status()


mofi_corpus()
