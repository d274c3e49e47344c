"""A local Airflow for one machine: the services `make demo` and `make airflow-up` run.

Everything lives in one home folder (``RUN/airflow`` for the demo): the SQLite metadata DB,
the configuration (environment variables, written to ``airflow.env`` for a shell to source),
the login (``passwords.json``: user ``admin``, a random password), each service's log, and
``services.json`` with the pid and start time of every service started. The services are
Airflow 3's api-server, scheduler (LocalExecutor, parallelism = the machine's cores),
dag-processor and triggerer, each in its own process group.

``up`` reuses services that are already running from this home (healthy: nothing is started
twice), replaces those whose process is gone (a stale ``services.json`` after a crash or a
reboot), refuses a port another program holds, migrates the DB and creates the ``gpu``
pool (one slot per device: scoring tasks run in it, so each device scores one batch at a
time). ``down`` stops what ``up`` started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from training.core import process

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
USER = "admin"
DEFAULT_PORT = 8080


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def device_count() -> int:
    """GPUs for the scoring pool (1 on a CPU-only machine: one CPU scoring worker at a time)."""
    try:
        import torch

        return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except ImportError:
        return 1


def dag_bundles(dag_folders: dict[str, str] | None = None) -> list[dict]:
    """Airflow's DAG bundle list: the project's ``dags/`` and each more folder (name -> path)."""
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    folders = {"dags-folder": os.path.join(REPO, "dags"), **(dag_folders or {})}
    return [
        {"name": name, "classpath": local, "kwargs": {"path": path}}
        for name, path in folders.items()
    ]


class LocalAirflow:
    """``extra_env``: settings for the DAGs (their params' defaults); ``dag_folders``: more DAG
    folders beside the project's ``dags/``, each loaded as a DAG bundle of its own (the
    demo's DAG)."""

    def __init__(
        self,
        home: str,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        dag_folders: dict[str, str] | None = None,
    ):
        self.home = os.path.abspath(home)
        self.dag_folders = dict(dag_folders or {})
        self.state_file = os.path.join(self.home, "services.json")
        saved = self._read_state()
        self.port = port or (saved or {}).get("port") or DEFAULT_PORT
        self.extra_env = dict(extra_env or {})
        self.airflow = os.path.join(os.path.dirname(sys.executable), "airflow")

    # ------------------------------------------------------------------ config
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def passwords_file(self) -> str:
        return os.path.join(self.home, "passwords.json")

    def password(self) -> str:
        with open(self.passwords_file) as f:
            return json.load(f)[USER]

    def _secret(self, name: str) -> str:
        path = os.path.join(self.home, f".{name}")
        if not os.path.exists(path):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(secrets.token_urlsafe(32))
        with open(path) as f:
            return f.read().strip()

    def env(self) -> dict[str, str]:
        cores = os.cpu_count() or 2
        env = {
            "AIRFLOW_HOME": self.home,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(max(2, cores)),
            "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(REPO, "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": self.passwords_file,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt_secret"),
            "AIRFLOW__API__SECRET_KEY": self._secret("api_secret"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": os.path.join(self.home, "logs"),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(
                dag_bundles(self.dag_folders)
            ),
        }
        # Spark stages read the Airflow connection spark_default: local[*] unless the
        # environment points it elsewhere (spark://, yarn, k8s://)
        env["AIRFLOW_CONN_SPARK_DEFAULT"] = os.environ.get(
            "AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[*]"})
        )
        env.update(self.extra_env)
        return env

    def full_env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        base["PATH"] = os.path.dirname(sys.executable) + os.pathsep + base.get("PATH", "")
        return {**base, **self.env()}

    def write_env_file(self) -> str:
        path = os.path.join(self.home, "airflow.env")
        with open(path, "w") as f:
            for k, v in sorted(self.env().items()):
                f.write(f"export {k}='{v}'\n")
        return path

    # ------------------------------------------------------------------ state
    def _read_state(self) -> dict[str, Any] | None:
        try:
            with open(self.state_file) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def running(self) -> dict[str, dict[str, Any]]:
        """The services of ``services.json`` whose process is still alive."""
        state = self._read_state() or {}
        return {
            name: rec
            for name, rec in state.get("services", {}).items()
            if not process.is_dead({**rec, "host": socket.gethostname()})
        }

    def healthy(self, timeout: float = 2.0) -> bool:
        import httpx

        try:
            r = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=timeout)
            body = r.json()
        except (httpx.HTTPError, ValueError):
            return False
        return r.status_code == 200 and all(
            body.get(k, {}).get("status") == "healthy"
            for k in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        )

    # ------------------------------------------------------------------ lifecycle
    def _airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.airflow, *args], env=self.full_env(), capture_output=True, text=True
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}"
            )
        return proc

    def up(self, wait_s: float = 180.0) -> dict[str, Any]:
        os.makedirs(os.path.join(self.home, "logs"), exist_ok=True)
        alive = self.running()
        if alive and len(alive) == len(SERVICES) and self.healthy():
            log.info("local Airflow already running at %s (reused)", self.url)
            return {"url": self.url, "reused": True, "services": alive}
        if alive:  # a partial or unhealthy set from an earlier run: replace it
            log.warning(
                "replacing stale Airflow services from %s: %s", self.state_file, sorted(alive)
            )
            self.down()
        elif self._read_state():
            log.info("earlier Airflow services of %s are gone; starting new ones", self.home)
        if not _port_free(self.port):
            raise RuntimeError(
                f"port {self.port} is in use by another program: choose another with --port "
                f"(or AIRFLOW_PORT=N for make)"
            )
        if not os.path.exists(self.passwords_file):
            with open(os.open(self.passwords_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                json.dump({USER: secrets.token_urlsafe(12)}, f)
        self.write_env_file()
        self._airflow("db", "migrate")
        self._airflow("pools", "set", "gpu", str(device_count()), "one slot per scoring device")
        services: dict[str, dict[str, Any]] = {}
        for name in SERVICES:
            logf = open(os.path.join(self.home, "logs", f"{name}.log"), "ab")
            p = subprocess.Popen(
                [self.airflow, name],
                env=self.full_env(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.home,
            )
            logf.close()
            services[name] = {"pid": p.pid, "proc_start": process.proc_start(p.pid)}
        with open(self.state_file, "w") as f:
            json.dump({"port": self.port, "started_at": time.time(), "services": services}, f)
        deadline = time.time() + wait_s
        while not self.healthy():
            dead = [n for n in SERVICES if n not in self.running()]
            if dead or time.time() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not healthy after {wait_s:.0f}s"
                tail = self._log_tail(dead[0] if dead else "api-server")
                self.down()
                raise RuntimeError(f"local Airflow did not start ({why}); log tail:\n{tail}")
            time.sleep(1.0)
        return {"url": self.url, "reused": False, "services": services}

    def _log_tail(self, name: str, n: int = 30) -> str:
        try:
            with open(os.path.join(self.home, "logs", f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def down(self, timeout_s: float = 15.0) -> list[str]:
        """Stop every service ``up`` started (their whole process groups); the stopped names."""
        state = self._read_state() or {}
        recs = state.get("services", {})
        stopped = []
        for name, rec in recs.items():
            if process.is_dead({**rec, "host": socket.gethostname()}):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rec["pid"], signal.SIGTERM)
                stopped.append(name)
        deadline = time.time() + timeout_s
        for rec in recs.values():
            while time.time() < deadline and not process.is_dead(
                {**rec, "host": socket.gethostname()}
            ):
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rec["pid"], signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.state_file)
        return stopped

    def status(self) -> dict[str, Any]:
        return {
            "home": self.home,
            "url": self.url,
            "running": sorted(self.running()),
            "healthy": self.healthy(),
            "login": {"user": USER, "password_file": self.passwords_file},
        }

    def client(self):
        from .client import AirflowClient

        return AirflowClient(self.url, USER, self.password())
