"""The library side of the DAGs' small tasks: plain functions, tested without Airflow.

* :func:`check_build_params` / :func:`check_train_params`: the first task of each DAG checks
  what JSON schema cannot (a named config exists, an input URI is there, an output root is
  writable) and fails at once with a message that says what to fix;
* :func:`shard_batches`: the scoring plan cut into batches for Airflow mapping (never more
  than ``MAX_MAP`` entries: the batch grows with the shard count);
* :func:`spark_args`: the Spark master and deploy mode from an Airflow connection, resolved
  the way the provider's ``SparkSubmitOperator`` resolves it;
* :func:`build_report`: the last task: fails naming the failed shards of every stage;
* :func:`build_version` / :func:`train_layout`: the folders a run writes, from the run's
  params (Jinja macros of the DAGs: the layouts name every folder, the DAGs spell none);
* :func:`reuse_source`: the earlier version an incremental build copies unchanged shards from;
* :func:`env_param`: a param whose default is a deployment setting.
"""

from __future__ import annotations

import math
from typing import Any

from training.core import storage
from training.core.config import ConfigError
from training.core.inputs import InputError

MAX_MAP = 1024  # Airflow's default max_map_length
BASELINE = "packaged"  # the backbone every machine has: the train DAG's baseline model
WISE_ALPHAS = "0,0.2,0.4,0.6,0.8,1"  # the train DAG's WiSE-FT mixing weights (validation only)


def default_args(owner: str, hours: float = 6) -> dict[str, Any]:
    """Owner, retries with exponential backoff and a timeout for every task of a DAG.

    ``MOFI_TASK_RETRIES`` (2) and ``MOFI_RETRY_DELAY_S`` (60: the first delay, doubling up to
    30 min) come from the environment of the process that parses the DAGs."""
    import os
    from datetime import timedelta

    return {
        "owner": owner,
        "retries": int(os.environ.get("MOFI_TASK_RETRIES", "2")),
        "retry_delay": timedelta(seconds=float(os.environ.get("MOFI_RETRY_DELAY_S", "60"))),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
        "execution_timeout": timedelta(hours=hours),
    }


def env_param(var: str, description: str, **schema: Any):
    """A param whose default is the deployment's setting ``$VAR``; without it the param is
    required (a trigger must give it, and a scheduled DAG cannot be scheduled without it)."""
    import os

    from airflow.sdk import Param

    value = os.environ.get(var)
    if value:
        return Param(value, description=f"{description} (default: ${var})", **schema)
    return Param(description=f"{description} (required: no ${var} in this deployment)", **schema)


def build_version(params: dict[str, Any], dag_run: Any):
    """The version a build run writes: ``params.version``, else the run's date."""
    from ..runtime.layout import VersionLayout

    when = dag_run.logical_date or dag_run.run_after
    return VersionLayout.of(params["root"], params.get("version") or when.strftime("%Y-%m-%d"))


def reuse_source(params: dict[str, Any], version: Any, events: list[Any]) -> str:
    """The run root an incremental build copies unchanged shards from, or ``"none"``.

    ``params.reuse_from``: ``latest`` (the newest version published on the ``mofi_i2e``
    asset, from ``events``; none before the first), ``none``, a version name under
    ``params.root``, or a version URI. A named build that is not there is an error."""
    from ..runtime import reuse
    from ..runtime.layout import VersionLayout
    from .assets import resolve_i2e_uri

    want = (params.get("reuse_from") or "latest").strip()
    if want == reuse.NONE:
        return reuse.NONE
    if want == "latest":
        try:
            want = resolve_i2e_uri("", {"mofi_i2e": events})
        except ConfigError:
            return reuse.NONE  # nothing published yet: the first build computes everything
    elif "/" not in want:  # a version name
        want = VersionLayout.of(params["root"], want).root
    source = reuse.resolve_source(want)
    if source is None or source.run.root.rstrip("/") == version.run.root.rstrip("/"):
        return reuse.NONE  # this version itself: its own done shards are kept anyway
    return source.run.root


def train_layout(params: dict[str, Any], run_id: str):
    """The folder a training run writes: ``ROOT/<run id>`` (made path-safe)."""
    from training.layout import TrainLayout

    return TrainLayout(storage.join(params["root"], run_id.replace(":", "_").replace("+", "_")))


def has_validation_folder(context: dict[str, Any]) -> bool:
    """The train DAG's WiSE-FT runs only with a validation folder (``params.val``)."""
    return bool(context["params"].get("val"))


def baseline_requested(context: dict[str, Any]) -> bool:
    return bool(context["params"].get("baseline"))


def baseline_metrics_template(layout_expr: str, folder: str) -> str:
    """Jinja for where the baseline's metrics on ``folder`` go in the training run's folder."""
    import json

    from evaluation.layout import folder_name

    args = f"{json.dumps(BASELINE)}, {json.dumps(folder_name(folder))}"
    return "{{ " + f"{layout_expr}.eval_metrics({args})" + " }}"


def check_build_params(params: dict[str, Any]) -> dict[str, Any]:
    from .. import recipes
    from ..runtime.raw import check_shards, discover
    from ..stages.kb.stage import load_kb

    recipes.get(params["config"])  # an unknown config names the known ones
    problems = []
    try:
        shards, bad = discover(params["raw"])
        if not shards:
            problems.append(f"raw {params['raw']}: no complete shard ({bad})")
        check_shards(shards)
    except (FileNotFoundError, InputError) as exc:
        problems.append(str(exc))
    try:
        load_kb(params["kb"])
    except (FileNotFoundError, ConfigError, InputError) as exc:
        problems.append(str(exc))
    threshold = params.get("threshold")
    if threshold is not None and not -1.0 <= float(threshold) <= 1.0:
        problems.append(f"threshold {threshold} is not a cosine similarity in [-1, 1]")
    if int(params.get("score_batch_shards", 1)) < 1:
        problems.append("score_batch_shards must be >= 1")
    if params.get("eval_folders"):
        from ..stages.hygiene.stage import eval_files

        for folder in params["eval_folders"]:
            try:
                eval_files((folder,))
            except (FileNotFoundError, ConfigError, OSError) as exc:
                problems.append(str(exc))
    _check_root(params["root"], problems)
    return {"raw_shards": len(shards)}


def check_train_params(params: dict[str, Any]) -> None:
    from evaluation.layout import CLASSES_FILE
    from training import recipes as train_recipes

    recipe = train_recipes.get(params["config"])
    problems = []
    if not params.get("root"):
        problems.append("params.root is empty: set MOFI_TRAIN_ROOT in the deployment or pass root")
    folders = eval_folders(params.get("images", ""))
    if not folders:
        problems.append(
            "params.images names no evaluation folder: set MOFI_EVAL_IMAGES or pass images"
        )
    for folder in folders:
        if not storage.exists(storage.join(folder, CLASSES_FILE)) and not storage.list_files(
            folder, suffix=".jpg"
        ):
            problems.append(f"eval folder {folder} has no images")
    val = params.get("val", "")
    if val and not storage.list_files(val, suffix=".jpg"):
        problems.append(f"validation folder {val} has no images")
    if val and recipe.model.random_init_towers():  # WiSE-FT would fail after training
        problems.append(
            f"params.val asks for WiSE-FT, but in config {params['config']!r} "
            f"{' and '.join(recipe.model.random_init_towers())} starts from a random "
            "initialisation: nothing to mix with; leave val empty or use a pretrained config"
        )
    alphas = params.get("wise_alphas", "0,1")
    try:
        bad = [a for a in alphas.split(",") if not 0.0 <= float(a) <= 1.0]
    except ValueError:
        bad = [alphas]
    if bad:
        problems.append(f"wise_alphas {alphas!r}: mixing weights are numbers in [0, 1]")
    if int(params.get("nnodes", 1)) > 1 and ":" not in params.get("rdzv_endpoint", ""):
        problems.append("nnodes > 1 needs rdzv_endpoint HOST:PORT")
    _check_root(params.get("root"), problems)


def _check_root(root: str | None, problems: list[str]) -> None:
    """The output root is writable (when given); then every problem found, in one error."""
    if root:
        try:
            storage.check_writable(root)
        except storage.StorageError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems) + ": fix the params and trigger again")


def eval_folders(images: str) -> list[str]:
    return [f.strip() for f in (images or "").split(",") if f.strip()]


def shard_batches(run_uri: str, batch_shards: int) -> list[str]:
    """The score plan's shards as comma-joined batches, at most ``MAX_MAP`` of them."""
    from ..runtime.layout import SCORE, RunLayout

    plan = RunLayout(run_uri).store(SCORE).read_plan()
    if not plan or not plan["shards"]:
        raise ConfigError(f"no score plan under {run_uri}: the prepare task did not run")
    shards = plan["shards"]
    size = max(int(batch_shards), math.ceil(len(shards) / MAX_MAP))
    return [",".join(shards[i : i + size]) for i in range(0, len(shards), size)]


def eval_folder_args(folders: list[str] | None) -> str:
    """`` --eval-folder F`` for each folder, shell-quoted (empty: the config's folders)."""
    import shlex

    return "".join(f" --eval-folder {shlex.quote(str(f))}" for f in folders or [])


def spark_args(conn_id: str = "spark_default") -> str:
    """``--master M [--deploy-mode D]`` from the Airflow connection ``conn_id`` (at task run
    time: a data engineer points it at spark://, yarn or k8s:// without touching code)."""
    import shlex

    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    conn = SparkSubmitHook(conn_id=conn_id)._resolve_connection()
    args = ["--master", conn["master"]]
    if conn.get("deploy_mode"):
        args += ["--deploy-mode", conn["deploy_mode"]]
    return " ".join(shlex.quote(a) for a in args)


def build_report(version_root: str) -> dict[str, Any]:
    """Every stage of a build version; raise naming the failed shards when there are any."""
    from ..runtime import status

    stages = status.summarize_run(version_root)
    failed = {
        f"{s['where']}:{s['stage']}": s["failed_shards"] for s in stages if s["failed_shards"]
    }
    if failed:
        raise RuntimeError(
            f"build {version_root} has failed shards {failed}; fix the cause, then clear the "
            "failed task(s): the rest of the version is kept"
        )
    return {f"{s['where']}:{s['stage']}": s["done"] for s in stages}
