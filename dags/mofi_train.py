"""Train a MOFI model on an I2E version, evaluate it, post the metrics.

Scheduled on the ``mofi_i2e`` asset (each finished I2E build triggers a run on that
version's URI) or triggered by hand with ``params.i2e``. Wiring only: training runs under
torchrun in its own processes (`mofi train`), evaluation in its own process (`mofi eval`),
which appends to the results store (and pushes to a Pushgateway when ``params.push`` is set).
Outputs go to ROOT/<run id>: a cleared or retried train task resumes from its newest
checkpoint.
"""

from __future__ import annotations

import shlex
import sys

import pendulum
from airflow.sdk import Asset, Param, dag, task

MOFI = f"{shlex.quote(sys.executable)} -m pipeline_tasks.cli"
I2E = "{{ ti.xcom_pull(task_ids='resolve_i2e') }}"
OUT = "{{ params.root }}/{{ run_id | replace(':', '_') | replace('+', '_') }}"


@dag(
    dag_id="mofi_train",
    schedule=[Asset("mofi_i2e")],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["mofi", "training"],
    params={
        "i2e": Param("", type="string", description="I2E root; empty: the triggering asset's"),
        "root": Param("runs/airflow/train", type="string", description="training runs root"),
        "config": Param(
            "demo",
            enum=["cpu_test", "demo", "b16_8gpu"],
            description="named training config (mofi config list)",
        ),
        "images": Param("runs/demo/eval", type="string", description="held-out eval folder"),
        "results": Param("", type="string", description="results store URL (empty: default)"),
        "push": Param("", type="string", description="Pushgateway URL (empty: no push)"),
    },
    doc_md=__doc__,
)
def mofi_train():
    @task
    def resolve_i2e(explicit: str, *, triggering_asset_events=None) -> str:
        from pipeline_tasks.assets import resolve_i2e_uri

        return resolve_i2e_uri(explicit, triggering_asset_events)

    @task.bash
    def train() -> str:
        return f"{MOFI} -q train --i2e {I2E} --out {OUT} --config {{{{ params.config }}}}"

    @task.bash
    def evaluate() -> str:
        results = "{% if params.results %} --results {{ params.results }}{% endif %}"
        push = "{% if params.push %} --push {{ params.push }}{% endif %}"
        return (
            f"{MOFI} -q eval --model {OUT}/model.pt --images {{{{ params.images }}}} "
            f"--run-id {{{{ run_id }}}} --no-progress{results}{push}"
        )

    resolve_i2e("{{ params.i2e }}") >> train() >> evaluate()


mofi_train()
