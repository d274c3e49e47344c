"""``mofi dashboard`` beyond loopback: no bind without a token, and 401 without it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

MOFI = [sys.executable, "-m", "pipeline_tasks.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_a_public_bind_without_a_token_is_refused(marker_tree, tmp_path):
    port = _free_port()
    roots = [str(marker_tree["demo"])]
    p = subprocess.run([*MOFI, "dashboard", "--roots", *roots, "--host", "0.0.0.0",
                        "--port", str(port)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MOFI_DASHBOARD_TOKEN": ""})  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and "without a token" in p.stderr
    short = tmp_path / "short"
    short.write_text("abc\n")
    p = subprocess.run([*MOFI, "dashboard", "--roots", *roots, "--host", "0.0.0.0",
                        "--token-file", str(short)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 2 and "shorter than 16" in p.stderr


@pytest.fixture
def guarded(marker_tree, tmp_path):
    token = "t0k3n-" + os.urandom(8).hex()
    f = tmp_path / "token"
    f.write_text(token + "\n")
    port = _free_port()
    proc = subprocess.Popen([*MOFI, "dashboard", "--roots", str(marker_tree["demo"]),
                             "--host", "0.0.0.0", "--port", str(port), "--token-file", str(f),
                             "--results", marker_tree["results"]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
    yield base, token
    proc.terminate()
    proc.wait(timeout=20)


def test_every_route_needs_the_token_beyond_loopback(guarded):
    base, token = guarded
    # bound on every address (a non-loopback one included), so it is reachable from outside
    assert _get(f"{base}/metrics")[0] == 401
    for path in ("/", "/api/snapshot", "/api/runs", "/api/results", "/metrics"):
        assert _get(base + path)[0] == 401, path
        wrong = {"Authorization": "Bearer " + "x" * len(token)}
        assert _get(base + path, wrong)[0] == 401, path
        status, _, body = _get(base + path, {"Authorization": f"Bearer {token}"})
        assert status == 200, (path, body[:200])
    # Prometheus passes the bearer token; the metrics are there
    assert b"mofi_" in _get(f"{base}/metrics", {"Authorization": f"Bearer {token}"})[2]
    # a browser opens /?token=... once; the page's own requests then carry the cookie
    status, headers, _ = _get(f"{base}/?token={token}")
    cookie = headers.get("set-cookie", "")
    assert status == 200 and "httponly" in cookie.lower(), headers
    jar = {"Cookie": cookie.split(";")[0]}
    assert _get(f"{base}/api/snapshot", jar)[0] == 200
    assert _get(f"{base}/?token=wrong-{token}")[0] == 401
