"""The deployment up on the hosts: every compose service as a process on its host, started in
order, waited for, restarted after a host is killed, and its memory sampled.

Postgres is Debian's server (the image's entrypoint, which this replaces, creates the user
and the database from compose's ``POSTGRES_*`` and runs ``docker/postgres-init``; so does
:meth:`Stack.start_postgres`); every other service runs the command compose gives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from typing import Any

from .hosts import Host, pg_dir
from .services import REPO, VENV_BIN, Service, ports, services

PG_BIN = "/usr/lib/postgresql/15/bin"
ENV_FILE = os.path.join(REPO, "docker", ".env.example")


def env_file_values() -> dict[str, str]:
    """The env file's keys with fresh secrets for its placeholders (``change-me-...``)."""
    out = {}
    with open(ENV_FILE) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            k, v = line.split("=", 1)
            out[k] = secrets.token_hex(12) if v.startswith("change-me") else v
    out["AIRFLOW_FERNET_KEY"] = out.get("AIRFLOW_FERNET_KEY") or _fernet_key()
    return out


def _fernet_key() -> str:
    import base64

    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def wait_port(host: Host, port: int, timeout_s: float, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{host.name}: the process for port {port} exited ({proc.returncode})"
            )
        with contextlib.suppress(OSError), socket.create_connection((host.address, port), 1):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{host.name}:{port} did not open in {timeout_s:.0f}s")


class Stack:
    def __init__(self, hosts: list[Host], env: dict[str, str]):
        self.hosts = {h.name: h for h in hosts}
        self.env = env
        self.procs: dict[tuple[str, str], subprocess.Popen] = {}
        self.services = {
            (s.host, s.name): s for s in services(env, {h.name: h.work for h in hosts}, {})
        }
        self.ports = ports(env)
        self.peak_rss: dict[str, int] = {h.name: 0 for h in hosts}
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    # -------------------------------------------------------------- environment
    def base_env(self, host: Host) -> dict[str, str]:
        """What every process of ``host`` gets beside its service's environment: the
        software (the same install on every host, like one image), the host's own folders."""
        tmp = host.tmp
        os.makedirs(tmp, exist_ok=True)
        conf = os.path.join(host.work, "spark-conf")
        events = os.path.join(host.work, "spark-events")
        os.makedirs(conf, exist_ok=True)
        os.makedirs(events, exist_ok=True)
        with open(os.path.join(conf, "spark-defaults.conf"), "w") as f:
            # Spark's own record of where each task ran (the run reads it back)
            f.write(
                f"spark.eventLog.enabled true\nspark.eventLog.dir file://{events}\n"
                "spark.eventLog.compress false\nspark.eventLog.rolling.enabled false\n"
            )
        return {
            "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": host.work,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONPATH": REPO,
            "PYTHONUNBUFFERED": "1",
            "SPARK_LOCAL_IP": host.address,
            "SPARK_WORKER_DIR": os.path.join(host.work, "spark-work"),
            "SPARK_CONF_DIR": conf,
            "PYSPARK_PYTHON": os.path.join(VENV_BIN, "python"),
            "JAVA_HOME": os.environ.get("JAVA_HOME", _java_home()),
            "MOFI_DATA_DIR": os.environ.get("MOFI_DATA_DIR", os.path.join(REPO, "data")),
            "NO_PROXY": "*",
        }

    def service_env(self, svc: Service) -> dict[str, str]:
        return {**self.base_env(self.hosts[svc.host]), **svc.env}

    # -------------------------------------------------------------- processes
    def start(self, host_name: str, name: str) -> subprocess.Popen:
        svc = self.services[(host_name, name)]
        host = self.hosts[host_name]
        logs = os.path.join(host.work, "logs")
        os.makedirs(logs, exist_ok=True)
        os.makedirs(os.path.join(host.work, "airflow"), exist_ok=True)
        log = open(os.path.join(logs, f"{name}.log"), "ab")
        argv = list(svc.argv)
        if name == "s3":  # the image keeps its data under /data, on the host's address
            argv += [f"-dir={host.work}/s3", f"-ip={host.address}", "-ip.bind=0.0.0.0"]
            os.makedirs(f"{host.work}/s3", exist_ok=True)
        p = host.popen(
            argv,
            env=self.service_env(svc),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=host.work,
            start_new_session=True,
        )
        log.close()
        self.procs[(host_name, name)] = p
        return p

    def run_oneshot(self, host_name: str, name: str, timeout_s: float = 300) -> None:
        p = self.start(host_name, name)
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            raise RuntimeError(
                f"{name} on {host_name} did not finish in {timeout_s:.0f}s"
            ) from None
        if rc != 0:
            raise RuntimeError(
                f"{name} on {host_name} failed ({rc}): {self.log_tail(host_name, name)}"
            )

    def log_tail(self, host_name: str, name: str, n: int = 25) -> str:
        path = os.path.join(self.hosts[host_name].work, "logs", f"{name}.log")
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def start_postgres(self) -> None:
        """Debian's server with compose's user, password and databases (the image's entrypoint
        and docker/postgres-init do this in the deployment)."""
        host = self.hosts["head"]
        env = self.services[("head", "postgres")].env
        # the server runs as the postgres user, which cannot enter a private working folder
        # (a test's tmp_path is 0700): its files live in hosts.pg_dir, removed by cleanup
        base = pg_dir(host.prefix)
        shutil.rmtree(base, ignore_errors=True)
        data, sock = os.path.join(base, "data"), os.path.join(base, "socket")
        for d in (base, data, sock):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, "postgres", "postgres")
        pw = os.path.join(base, "password")
        with open(pw, "w") as f:
            f.write(env["POSTGRES_PASSWORD"])
        shutil.chown(pw, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*as_pg, f"{PG_BIN}/initdb", "-D", data, "-U", env["POSTGRES_USER"], f"--pwfile={pw}",
             "--auth-local=trust", "--auth-host=scram-sha-256"],
            check=True, capture_output=True,
        )  # fmt: skip
        with open(os.path.join(data, "pg_hba.conf"), "a") as f:
            f.write("host all all 10.0.0.0/8 scram-sha-256\n")
        self.services[("head", "postgres")].argv = [
            *as_pg, f"{PG_BIN}/postgres", "-D", data, "-k", sock, "-c", "listen_addresses=*",
            "-c", "max_connections=200",
        ]  # fmt: skip
        p = self.start("head", "postgres")
        wait_port(host, 5432, 60, p)
        user, db = env["POSTGRES_USER"], env["POSTGRES_DB"]
        host.run(
            [*as_pg, "psql", "-h", sock, "-U", user, "-d", "postgres", "-v", "ON_ERROR_STOP=1",
             "-c", f'CREATE DATABASE "{db}" OWNER "{user}"'],
            check=True, capture_output=True,
        )  # fmt: skip
        init = os.path.join(REPO, "docker", "postgres-init", "10-mofi-results-db.sh")
        host.run(
            [*as_pg, "env", f"PGHOST={sock}", f"POSTGRES_USER={user}", f"POSTGRES_DB={db}",
             f"MOFI_RESULTS_DB={env['MOFI_RESULTS_DB']}", "sh", init],
            check=True, capture_output=True,
        )  # fmt: skip

    def up(self) -> None:
        """Every service in PLACEMENT order, each waited for before the next depends on it."""
        head = self.hosts["head"]
        self.start_postgres()
        for name in ("redis", "s3", "spark-master"):
            p = self.start("head", name)
            wait_port(head, self.ports[name], 120, p)
        self.wait_s3()
        self.run_oneshot("head", "airflow-init", 600)
        for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                     "airflow-triggerer"):  # fmt: skip
            self.start("head", name)
        self.wait_api(300)
        for host in ("worker1", "worker2"):
            self.start_host(host)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def start_host(self, host_name: str) -> None:
        """Every service of a worker host (again, after it was killed)."""
        for h, name in list(self.services):
            if h == host_name:
                self.start(h, name)

    def wait_s3(self, timeout_s: float = 120) -> None:
        url = f"http://{self.hosts['head'].address}:{self.ports['s3']}/healthz"
        self._wait_http(url, timeout_s)

    def wait_api(self, timeout_s: float) -> None:
        url = f"http://{self.hosts['head'].address}:8080/api/v2/monitor/health"
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=3).read())
                if all(body.get(k, {}).get("status") == "healthy"
                       for k in ("metadatabase", "scheduler", "triggerer", "dag_processor")):  # fmt: skip
                    return
            except (OSError, ValueError):
                pass
            time.sleep(2)
        raise RuntimeError(f"Airflow is not healthy after {timeout_s:.0f}s: "
                           f"{self.log_tail('head', 'airflow-apiserver')}")  # fmt: skip

    def _wait_http(self, url: str, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url, timeout=3)
                return
            time.sleep(1)
        raise RuntimeError(f"{url} did not answer in {timeout_s:.0f}s")

    # -------------------------------------------------------------- memory
    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(2.0):
            for name, host in self.hosts.items():
                total = 0
                for pid in host.pids():
                    with contextlib.suppress(psutil.Error):
                        total += psutil.Process(pid).memory_info().rss
                self.peak_rss[name] = max(self.peak_rss[name], total)

    def stop_sampling(self) -> None:
        self._stop.set()

    def credentials(self) -> dict[str, Any]:
        return {
            "api": f"http://{self.hosts['head'].address}:8080",
            "user": self.env.get("AIRFLOW_ADMIN_USER", "admin"),
            "password": self.env["AIRFLOW_ADMIN_PASSWORD"],
        }


def _java_home() -> str:
    java = shutil.which("java")
    if not java:
        return ""
    return os.path.dirname(os.path.dirname(os.path.realpath(java)))
