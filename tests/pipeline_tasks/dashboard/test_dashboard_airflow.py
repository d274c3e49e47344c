"""The plugin inside a real ``airflow api-server``: listed, mounted at /mofi, and behind
Airflow's authentication (SimpleAuthManager with a user and a passwords file)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

AIRFLOW = os.path.join(os.path.dirname(sys.executable), "airflow")
USER, PASSWORD = "engineer", "correct-horse-battery"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_server(tmp_path_factory, request):
    """A real api-server on a free port; its own AIRFLOW_HOME, users and dashboard roots."""
    home = tmp_path_factory.mktemp("airflow-home")
    marker_tree = request.getfixturevalue("module_tree")
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:viewer",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__API_AUTH__JWT_SECRET": "mofi-test-secret-" + "x" * 32,
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "MOFI_DASHBOARD_ROOTS": marker_tree["demo"],
            "MOFI_RESULTS_URL": marker_tree["results"],
        }
    )
    subprocess.run(
        [AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300
    )
    log = open(home / "api-server.log", "w")
    proc = subprocess.Popen(
        [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    try:
        while True:
            try:
                if httpx.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError(
                    "api-server did not come up:\n" + (home / "api-server.log").read_text()[-3000:]
                )
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def module_tree(tmp_path_factory):
    from dashboard_trees import write_done

    from pipeline_tasks.runtime import markers

    root = tmp_path_factory.mktemp("af-runs") / "demo"
    store = markers.MarkerStore(str(root / "i2e_run" / "ner"), "ner")
    store.write_plan(["00000", "00001"])
    write_done(store, "00000", 10, 9, {"caption_empty": 1})
    store.mark_failed("00001", "ValueError: no captions", markers.ShardStats())
    return {"demo": str(root), "results": f"sqlite:///{root.parent}/results.sqlite"}


def _token(base: str, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(
        f"{base}/auth/token", json={"username": USER, "password": password}, timeout=10
    )


def test_unauthenticated_requests_are_refused(api_server):
    for path in ("/mofi/api/runs", "/mofi/api/snapshot", "/mofi/metrics", "/mofi/"):
        r = httpx.get(api_server + path, timeout=10)
        assert r.status_code in (401, 403), (path, r.status_code, r.text[:200])
    bad = httpx.get(
        api_server + "/mofi/api/runs", headers={"Authorization": "Bearer not-a-jwt"}, timeout=10
    )
    assert bad.status_code in (401, 403)
    assert _token(api_server, "wrong password").status_code in (401, 403)


def test_a_jwt_from_auth_token_is_accepted(api_server):
    r = _token(api_server)
    assert r.status_code in (200, 201), r.text
    jwt = r.json()["access_token"]
    runs = httpx.get(
        api_server + "/mofi/api/runs", headers={"Authorization": f"Bearer {jwt}"}, timeout=30
    )
    assert runs.status_code == 200, runs.text
    (run,) = runs.json()["runs"]
    assert run["id"] == "demo" and run["stages"][0]["failed_shards"][0]["shard"] == "00001"
    # the UI's session cookie works as well: what the iframe of the nav entry sends
    page = httpx.get(api_server + "/mofi/", cookies={"_token": jwt}, timeout=30)
    assert page.status_code == 200 and '<meta name="mofi-base" content="/mofi/">' in page.text
    metrics = httpx.get(api_server + "/mofi/metrics", cookies={"_token": jwt}, timeout=30)
    assert metrics.status_code == 200
    assert (
        'mofi_shards{path="i2e_run/ner",run="demo",stage="ner",state="failed"} 1.0' in metrics.text
    )


def test_the_plugin_is_listed_with_its_app_and_nav_entry(api_server):
    jwt = _token(api_server).json()["access_token"]
    r = httpx.get(
        api_server + "/api/v2/plugins", headers={"Authorization": f"Bearer {jwt}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    (plugin,) = [p for p in r.json()["plugins"] if p["name"] == "mofi_dashboard"]
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/mofi"]
    (view,) = plugin["external_views"]
    assert view["href"] == "/mofi/" and view["url_route"] == "mofi"
