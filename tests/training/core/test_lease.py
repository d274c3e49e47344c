"""Leases and liveness: one holder at a time, a dead or silent holder binds nobody."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from training.core import lease, process, storage


def test_second_holder_is_refused_naming_the_first(storage_root):
    uri = storage.join(storage_root, "_lease.json")
    a = lease.Lease(uri, what="job A").acquire()
    try:
        with pytest.raises(lease.LeaseHeld, match=f"pid {os.getpid()} \\(job A\\)"):
            lease.Lease(uri, what="job B").acquire()
    finally:
        a.release()
    assert not storage.exists(uri)
    with lease.Lease(uri, what="job B"):
        assert storage.read_json(uri)["what"] == "job B"


def test_a_dead_holder_binds_nobody(tmp_path):
    uri = str(tmp_path / "_lease.json")
    code = (
        "import sys; from training.core import lease; "
        f"lease.Lease({uri!r}, what='doomed').acquire(); print('held', flush=True); "
        "import time; time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    rec = json.load(open(uri))
    assert process.liveness(rec) == "live"
    p.kill()
    p.wait()
    assert process.liveness(rec) == "dead"  # the file is still there, its process is not
    with lease.Lease(uri, what="next") as got:
        assert got.held and storage.read_json(uri)["what"] == "next"


def test_a_silent_holder_on_another_host_expires():
    now = time.time()
    other = {"host": "elsewhere", "pid": 1, "started_at": now - 999, "heartbeat_at": now - 10}
    assert process.liveness(other, now) == "live"
    assert (
        process.liveness({**other, "heartbeat_at": now - process.STALE_AFTER_S - 1}, now)
        == "silent"
    )


def test_reused_pid_is_not_the_holder():
    me = process.whoami()
    assert process.liveness({**me, "heartbeat_at": time.time()}) == "live"
    assert process.is_dead({**me, "proc_start": me["proc_start"] + 12345})
