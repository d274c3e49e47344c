"""The deployment's services, read from ``docker/compose.yaml``: the one description that both
``docker compose`` and ``make cluster`` run, so they cannot drift apart.

From compose this module takes each service's environment (the ``x-s3-env`` and
``x-airflow-env`` blocks: S3 endpoint and keys, the metadata DB and Celery URLs, the Spark
connection, the DAGs' parameter defaults), its command (Airflow's services, the Celery
workers with their queues and concurrency, the Spark master and workers, Redis, the S3
server, the init script) and its ports, interpolated the way compose does (``${VAR:-d}``,
``${VAR:?msg}``, ``$$``) from the same env file keys. What the run adds is only what
containers would otherwise give:

* :data:`PLACEMENT`: which host runs which service;
* :data:`PATHS`: the images' paths (``/opt/mofi``, ``/opt/spark``, ``/opt/airflow``,
  ``/data``) mapped to the checkout, the pyspark install and each host's working folder;
* :data:`PORT_MOVES`: ports that two services of one host would both take (containers each
  have their own network stack; the head here has one);
* :data:`RUN_SETTINGS`: the settings a real deployment would choose differently for its
  scale (how soon a dead worker's task is retried), listed in the README.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPOSE = os.path.join(REPO, "docker", "compose.yaml")
VENV_BIN = os.path.dirname(sys.executable)

# host -> compose services it runs, in start order
PLACEMENT: dict[str, list[str]] = {
    "head": [
        "postgres",
        "redis",
        "s3",
        "spark-master",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
    ],
    "worker1": ["spark-worker", "airflow-worker", "airflow-trainer"],
    "worker2": ["spark-worker", "airflow-worker-gpu", "airflow-trainer"],
}
# the compose service names other hosts reach a service by (compose's network DNS)
ALIASES = {"head": ["postgres", "redis", "s3", "spark-master", "airflow-apiserver"]}
# service -> (port option as it appears in its command or as a flag, port here)
PORT_MOVES = {
    "spark-master": {"--webui-port": "8081"},  # the api-server has 8080 on the head
    "s3": {"-volume.port": "8082"},  # SeaweedFS's volume server defaults to 8080 too
}
RUN_SETTINGS = {
    # a task whose worker died is failed (then retried) after 30 s, not 5 minutes
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    "MOFI_TASK_RETRIES": "3",
    "MOFI_RETRY_DELAY_S": "3",
    # two cores for the whole deployment: fewer api-server and Celery processes
    "AIRFLOW_API_WORKERS": "1",
    "AIRFLOW_WORKER_CONCURRENCY": "2",
    "AIRFLOW_PARALLELISM": "8",
    "SPARK_WORKER_CORES": "1",
    "SPARK_WORKER_MEMORY": "2g",
    # one thread per training rank, as torchrun sets when several ranks share a node: the
    # same world size then computes the same numbers however it is spread over hosts
    "OMP_NUM_THREADS": "1",
}


def spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


def weed_binary() -> str:
    path = shutil.which("weed", path=VENV_BIN) or shutil.which("weed")
    if not path:
        raise FileNotFoundError("SeaweedFS's `weed` is not installed: run `make setup`")
    return path


PATHS = {
    "/opt/spark": spark_home,
    "/opt/mofi/runs": lambda: "{work}/runs",
    "/opt/mofi": lambda: REPO,
    "/opt/airflow": lambda: "{work}/airflow",
    "/tmp/spark-local": lambda: "{work}/spark-local",
}


# ------------------------------------------------------------------ compose's own rules

_VAR = re.compile(
    r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


class ComposeError(ValueError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation of every string in ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        have = env.get(name)
        empty = have is None or (op is not None and op.startswith(":") and have == "")
        if op and op.endswith("-"):
            return arg if empty else have
        if op and op.endswith("?"):
            if empty:
                raise ComposeError(f"{name}: {arg}")
            return have
        return have or ""

    return _VAR.sub(one, value)


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    """docker/compose.yaml with its anchors merged and its variables interpolated."""
    import yaml

    with open(COMPOSE) as f:
        doc = yaml.safe_load(f)
    return interpolate(doc["services"], env)


# ------------------------------------------------------------------ services on hosts


@dataclasses.dataclass
class Service:
    """One compose service as a process on one host."""

    name: str
    host: str
    argv: list[str]
    env: dict[str, str]
    oneshot: bool = False  # runs to completion (airflow-init), others run on


def _map_paths(text: str, work: str) -> str:
    for prefix, target in PATHS.items():
        text = re.sub(rf"{re.escape(prefix)}(?=/|$|\s|\")", target().replace("{work}", work), text)
    return text


def _argv(name: str, svc: dict[str, Any]) -> list[str]:
    entry = svc.get("entrypoint") or []
    cmd = svc.get("command") or []
    entry = [entry] if isinstance(entry, str) else list(entry)
    cmd = cmd.split() if isinstance(cmd, str) else list(cmd)
    if name == "s3":  # the image's entrypoint is `weed`
        return [weed_binary(), *cmd]
    if name == "redis" or name == "postgres":
        return cmd
    argv = entry + cmd
    if argv and argv[0] == "airflow":
        argv[0] = os.path.join(VENV_BIN, "airflow")
    return argv


def _move_ports(name: str, argv: list[str]) -> list[str]:
    moves = PORT_MOVES.get(name, {})
    out = list(argv)
    for opt, port in moves.items():
        if opt in out:
            out[out.index(opt) + 1] = port
        else:
            out.append(f"{opt}={port}")
    return out


def services(env: dict[str, str], works: dict[str, str], extra: dict[str, str]) -> list[Service]:
    """Every placed service, its argv and environment on its host (``works``: host ->
    working folder; ``extra``: the run's own environment for every process)."""
    compose = load_compose({**env, **RUN_SETTINGS})
    out = []
    for host, names in PLACEMENT.items():
        work = works[host]
        for name in names:
            if name not in compose:
                raise ComposeError(f"docker/compose.yaml has no service {name!r}")
            svc = compose[name]
            argv = [_map_paths(a, work) for a in _move_ports(name, _argv(name, svc))]
            senv = {k: _map_paths(str(v), work) for k, v in (svc.get("environment") or {}).items()}
            senv.update(RUN_SETTINGS)
            out.append(
                Service(name, host, argv, {**senv, **extra}, oneshot=svc.get("restart") == "no")
            )
    return out


def ports(env: dict[str, str]) -> dict[str, int]:
    """The ports the placed services listen on (what the run waits for)."""
    return {
        "postgres": 5432,
        "redis": 6379,
        "s3": int(_flag(load_compose(env)["s3"].get("command", []), "-s3.port", "8333")),
        "spark-master": 7077,
        "airflow-apiserver": 8080,
    }


def _flag(argv: list[str], opt: str, default: str) -> str:
    for a in argv:
        if a.startswith(opt + "="):
            return a.split("=", 1)[1]
    return default
