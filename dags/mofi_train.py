"""Train a MOFI model on an I2E version, evaluate it, post the metrics.

Scheduled on the ``mofi_i2e`` asset (each finished I2E build triggers a run on that
version's URI) or triggered by ML ops with params (UI, ``airflow dags trigger mofi_train -c
'{...}'``, or ``POST /api/v2/dags/mofi_train/dagRuns``): the I2E version, the named config,
nodes and processes per node. Wiring only: training runs under torchrun in its own processes
(`mofi train`, one mapped task per node: with ``nnodes`` > 1 each node's task joins the c10d
rendezvous at ``rdzv_endpoint``), evaluation in its own process (`mofi eval`, one mapped task
per image folder, plus the packaged backbone as the baseline when ``params.baseline``),
which appends to the results store and pushes to a Pushgateway when ``params.push`` is set.
With a validation folder (``params.val``) the trained model is also mixed with its pretrained
towers (`mofi wise-ft`: the curve over the mixing weight, chosen on that folder) and the mix
is evaluated on every folder as ``<run id>/wise``; without one, those tasks are skipped, as
is the baseline when it is not asked for.
Outputs go to ROOT/<run id> (``training.layout.TrainLayout``): a cleared or retried train
task resumes from its newest checkpoint. ``root`` and ``images`` default to the deployment's
``MOFI_TRAIN_ROOT`` and ``MOFI_EVAL_IMAGES``; ``check_params`` refuses a run without them.
"""

from __future__ import annotations

import os
import shlex
import sys
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, task

from pipeline_tasks.orchestration import dag_tasks
from training import recipes

MOFI = f"{shlex.quote(sys.executable)} -m pipeline_tasks.cli"
I2E = "{{ ti.xcom_pull(task_ids='resolve_i2e') }}"
OUT = "train_layout(params, run_id)"
POST = (
    "{% if params.results %} --results {{ params.results }}{% endif %}"
    "{% if params.push %} --push {{ params.push }}{% endif %}"
)

DEFAULT_ARGS = dag_tasks.default_args(owner="mofi-mlops", hours=2)


def eval_command(model: str, folder: str, run_id: str, out: str = "") -> str:
    """`mofi eval` of ``model`` on ``folder``, posted under ``run_id``."""
    out = f" --out {out}" if out else ""
    return (
        f"{MOFI} -q eval --model {model} --images {folder}{out} --run-id {run_id} "
        f"--no-progress{POST}"
    )


@dag(
    dag_id="mofi_train",
    schedule=[Asset("mofi_i2e")],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    user_defined_macros={"train_layout": dag_tasks.train_layout},
    tags=["mofi", "training"],
    params={
        "i2e": Param("", type="string", description="I2E root; empty: the triggering asset's"),
        "root": Param(
            os.environ.get("MOFI_TRAIN_ROOT", ""),
            type="string",
            description="training runs root (each run in ROOT/<run id>; default: $MOFI_TRAIN_ROOT)",
        ),
        "config": Param(
            os.environ.get("MOFI_TRAIN_CONFIG", "b16_8gpu"),
            enum=list(recipes.RECIPES),
            description="named training config (mofi config list)",
        ),
        "nnodes": Param(
            int(os.environ.get("MOFI_TRAIN_NNODES") or 1),
            type="integer",
            minimum=1,
            description="nodes: one train task each, on the queue train (one per trainer host)",
        ),
        "nproc_per_node": Param(
            int(os.environ.get("MOFI_TRAIN_NPROC_PER_NODE") or 0),
            type="integer",
            minimum=0,
            description="processes per node (0: the config's)",
        ),
        "rdzv_endpoint": Param(
            os.environ.get("MOFI_TRAIN_RDZV_ENDPOINT", ""),
            type="string",
            description="HOST:PORT of the c10d rendezvous (nnodes > 1): a trainer host's",
        ),
        "epochs": Param(
            int(os.environ.get("MOFI_TRAIN_EPOCHS") or 0),
            type="integer",
            minimum=0,
            description="epochs (0: the config's)",
        ),
        "images": Param(
            os.environ.get("MOFI_EVAL_IMAGES", ""),
            type="string",
            description="eval folders in GPR1200 naming, comma separated (default: $MOFI_EVAL_IMAGES)",
        ),
        "val": Param(
            os.environ.get("MOFI_VAL_IMAGES", ""),
            type="string",
            description="validation folder for WiSE-FT's mixing weight (empty: no WiSE-FT)",
        ),
        "wise_alphas": Param(
            dag_tasks.WISE_ALPHAS,
            type="string",
            pattern=r"^[0-9.]+(,[0-9.]+)*$",
            description="WiSE-FT mixing weights measured on the validation folder",
        ),
        "baseline": Param(
            os.environ.get("MOFI_EVAL_BASELINE", "") == "1",
            type="boolean",
            description="also evaluate the packaged backbone on the same folders",
        ),
        "results": Param(
            os.environ.get("MOFI_RESULTS_URL", ""),
            type="string",
            description="results store URL (empty: the default)",
        ),
        "push": Param("", type="string", description="Pushgateway URL (empty: no push)"),
    },
    doc_md=__doc__,
)
def mofi_train():
    @task
    def check_params(params=None) -> list[int]:
        """The config exists, the folders have images, the output is writable; the node list."""
        dag_tasks.check_train_params(params)
        return list(range(int(params["nnodes"])))

    @task
    def resolve_i2e(explicit: str, *, triggering_asset_events=None) -> str:
        from pipeline_tasks.orchestration.assets import resolve_i2e_uri

        return resolve_i2e_uri(explicit, triggering_asset_events)

    @task.bash(queue="train", execution_timeout=timedelta(hours=72))
    def train(node: int) -> str:
        dist = (
            "{% if params.epochs %} --epochs {{ params.epochs }}{% endif %}"
            "{% if params.nproc_per_node %} --nproc-per-node {{ params.nproc_per_node }}{% endif %}"
            "{% if params.nnodes > 1 %} --nnodes {{ params.nnodes }}"
            " --rdzv-endpoint {{ params.rdzv_endpoint }}{% endif %}"
        )
        return (
            f"{MOFI} -q train --i2e {I2E} --out {{{{ {OUT}.root }}}} --config {{{{ params.config }}}}{dist}"
            f"  # node {node}"
        )

    @task
    def folders(images: str) -> list[str]:
        return dag_tasks.eval_folders(images)

    @task.bash
    def evaluate(folder: str) -> str:
        return eval_command(f"{{{{ {OUT}.model }}}}", folder, "{{ run_id }}")

    @task.run_if(dag_tasks.has_validation_folder, skip_message="no validation folder (params.val)")
    @task.bash
    def wise_ft() -> str:
        return (
            f"{MOFI} -q wise-ft --model {{{{ {OUT}.model }}}} --val {{{{ params.val }}}} "
            f"--out {{{{ {OUT}.wise_model }}}} --alphas {{{{ params.wise_alphas }}}}"
        )

    @task.bash
    def evaluate_wise(folder: str) -> str:
        return eval_command(f"{{{{ {OUT}.wise_model }}}}", folder, "{{ run_id }}/wise")

    @task.run_if(dag_tasks.baseline_requested, skip_message="baseline not requested")
    @task.bash
    def evaluate_baseline(folder: str) -> str:
        base = dag_tasks.BASELINE
        out = dag_tasks.baseline_metrics_template(OUT, folder)
        return eval_command(base, folder, f"{{{{ run_id }}}}/{base}", out)

    nodes = check_params()
    i2e = resolve_i2e("{{ params.i2e }}")
    trained = train.expand(node=nodes)
    nodes >> i2e >> trained
    eval_folders = folders("{{ params.images }}")
    trained >> eval_folders
    evaluate.expand(folder=eval_folders)
    evaluate_baseline.expand(folder=eval_folders)
    mixed = wise_ft()
    trained >> mixed >> evaluate_wise.expand(folder=eval_folders)


mofi_train()
