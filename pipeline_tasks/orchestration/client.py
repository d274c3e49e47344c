"""A small client of Airflow 3's REST API (``/api/v2``, a JWT from ``POST /auth/token``).

What ML ops and the demo do over REST: unpause a DAG, trigger a run with its conf, read runs
and their task instances, wait for a run to finish.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

FINISHED = {"success", "failed"}


class AirflowError(RuntimeError):
    pass


class AirflowClient:
    def __init__(self, base_url: str, username: str, password: str, timeout: float = 30.0):
        self.base = base_url.rstrip("/")
        self.username, self.password = username, password
        self.http = httpx.Client(timeout=timeout)
        self._token: str | None = None

    def token(self) -> str:
        r = self.http.post(
            f"{self.base}/auth/token",
            json={"username": self.username, "password": self.password},
        )
        if r.status_code not in (200, 201):
            raise AirflowError(
                f"login to {self.base} as {self.username} failed: {r.status_code} {r.text[:200]}"
            )
        self._token = r.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, **kw) -> Any:
        for attempt in (0, 1):
            if self._token is None:
                self.token()
            r = self.http.request(
                method,
                f"{self.base}/api/v2{path}",
                headers={"Authorization": f"Bearer {self._token}"},
                **kw,
            )
            if r.status_code == 401 and attempt == 0:  # expired token: log in again
                self._token = None
                continue
            if r.status_code >= 400:
                raise AirflowError(f"{method} {path}: {r.status_code} {r.text[:300]}")
            return r.json() if r.content else None
        raise AirflowError(f"{method} {path}: not authorised")

    # ------------------------------------------------------------------ DAGs and runs
    def dag(self, dag_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}")

    def wait_for_dags(self, dag_ids: list[str], timeout_s: float = 120.0) -> None:
        """Until the dag-processor has parsed them (right after the services start)."""
        deadline = time.time() + timeout_s
        while True:
            try:
                for d in dag_ids:
                    self.dag(d)
                return
            except AirflowError as exc:
                if time.time() > deadline:
                    raise AirflowError(
                        f"DAGs {dag_ids} not parsed after {timeout_s:.0f}s: {exc}"
                    ) from exc
                time.sleep(2.0)

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": paused})

    def trigger(self, dag_id: str, conf: dict[str, Any], logical_date: str | None = None) -> dict:
        return self.request(
            "POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": logical_date, "conf": conf}
        )

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "-run_after"})[
            "dag_runs"
        ]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        out, offset = [], 0
        while True:
            page = self.request(
                "GET",
                f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                params={"limit": 100, "offset": offset},
            )
            out += page["task_instances"]
            offset += len(page["task_instances"])
            if not page["task_instances"] or offset >= page["total_entries"]:
                return out

    def clear(
        self, dag_id: str, run_id: str, tasks: list, include_downstream: bool = True
    ) -> list[dict[str, Any]]:
        """Clear task instances (``task_id`` or ``[task_id, map_index]``) so they run again."""
        body = {
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": tasks,
            "only_failed": False,
            "include_downstream": include_downstream,
            "reset_dag_runs": True,
        }
        return self.request("POST", f"/dags/{dag_id}/clearTaskInstances", json=body)[
            "task_instances"
        ]

    def wait(self, dag_id: str, run_id: str, timeout_s: float, poll_s: float = 5.0, on_poll=None):
        """The finished run; ``on_poll(run, task_instances)`` after every poll."""
        deadline = time.time() + timeout_s
        while True:
            run = self.run(dag_id, run_id)
            if on_poll is not None:
                on_poll(run, self.task_instances(dag_id, run_id))
            if run["state"] in FINISHED:
                return run
            if time.time() > deadline:
                raise AirflowError(
                    f"{dag_id} run {run_id} still {run['state']} after {timeout_s:.0f}s"
                )
            time.sleep(poll_s)

    def asset_triggered_run(self, dag_id: str, after: float, timeout_s: float) -> dict[str, Any]:
        """The first run of ``dag_id`` an asset event triggered at or after ``after`` (Unix
        time), once it exists."""
        import datetime

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for r in self.runs(dag_id):
                when = datetime.datetime.fromisoformat(r["run_after"]).timestamp()
                if r.get("run_type") == "asset_triggered" and when >= after - 1:
                    return r
            time.sleep(2.0)
        raise AirflowError(f"no {dag_id} run was triggered by an asset within {timeout_s:.0f}s")
