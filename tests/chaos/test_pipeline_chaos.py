"""Chaos on the I2E build: kill -9 at random points, concurrent runs on one root, outputs
damaged behind their done markers. Every rerun must give the bytes of an uninterrupted build,
no duplicate keys, pairs in = kept + dropped by reason, and no stale markers or temp files.

Quick by default (one stage, one seed: part of `make test`); `make chaos` (MOFI_CHAOS=full)
kills every stage over several seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import psutil
import pytest

from pipeline_tasks.runtime import markers, status

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
FULL = os.environ.get("MOFI_CHAOS") == "full"
SEEDS = list(range(3)) if FULL else [int(os.environ.get("MOFI_CHAOS_SEED", "0"))]
STAGES = ["ner", "score", "hygiene", "vocab", "write"] if FULL else ["score", "write"]
SKIP_NAMES = ("_info.json",)  # records the run's own paths


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline_tasks.cli", "-q", *args]


def _build(corpus, run, i2e) -> list[str]:
    return _cli(
        "build-i2e", "--raw", corpus["raw"], "--kb", corpus["kb"], "--run", str(run),
        "--out", str(i2e), "--config", "cpu_test", "--no-progress",
    )  # fmt: skip


def _digests(*roots) -> dict[str, str]:
    out = {}
    for root in roots:
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in ("_markers", "_work")]
            for f in files:
                if f.endswith(".config.json") or f in SKIP_NAMES or ".tmp-" in f:
                    continue
                path = os.path.join(d, f)
                rel = os.path.join(os.path.basename(root), os.path.relpath(path, root))
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _assert_clean(top: str) -> None:
    """No temp files, no stale, invalid, running or failed shards; pairs in = kept + dropped."""
    temps = [f for _, _, fs in os.walk(top) for f in fs if ".tmp-" in f]
    assert temps == [], temps
    for s in status.summarize_run(top):
        where = f"{s['where']}:{s['stage']}"
        assert s["complete"], (where, s)
        assert not (s["stale_running"] or s["invalid"] or s["running"] or s["failed"]), where
        if s["stage"] in ("ner", "score", "labels", "write"):
            assert s["samples_in"] == s["samples_out"] + sum(s["drops"].values()), where


def _assert_unique_keys(i2e) -> int:
    keys = []
    for name in sorted(os.listdir(i2e)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(i2e, name)) as t:
                keys += [
                    m.name.split(".", 1)[0] for m in t.getmembers() if m.name.endswith(".json")
                ]
    assert len(keys) == len(set(keys)) > 0
    return len(keys)


def _kill_group(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGKILL the run's whole process group; prove every process of it is gone."""
    parent = psutil.Process(proc.pid)
    tree = [parent, *parent.children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    assert not alive, f"still running after the kill: {alive}"
    return len(tree)


def _marker_dir(root, stage: str) -> str:
    return os.path.join(root, "_markers", stage)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    top = tmp_path_factory.mktemp("chaos_ref")
    run, i2e = top / "run", top / "i2e"
    proc = subprocess.run(_build(tiny_corpus, run, i2e), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_clean(str(top))
    return {
        "digests": _digests(run, i2e),
        "top": top,
        "run": run,
        "i2e": i2e,
        "n": _assert_unique_keys(i2e),
    }


# stage -> (the marker store that claims the shard, the shard's output), relative to the test
# folder; {shard} is filled in per seed
TARGETS = {
    "ner": ("run/ner/_markers/ner", "run/ner/{shard}.parquet"),
    "score": ("run/score/_markers/score", "run/score/{shard}.parquet"),
    "vocab": ("run/labels/_markers/labels", "run/labels/{shard}.parquet"),
    "write": ("i2e/_markers/write", "i2e/{shard}.tar"),
}


# what a build has done before it reaches the stage: copied from the reference, so the run
# that is killed starts at its stage (the build resumes past done stages, verifying them)
BEFORE = {
    "ner": (),
    "score": ("ner",),
    "vocab": ("ner", "scorer", "score"),
    "write": ("ner", "scorer", "score", "labels", "vocab"),
}


def _temps_of(path) -> list[str]:
    d, name = os.path.split(str(path))
    return (
        sorted(f for f in os.listdir(d) if f.startswith(f".{name}.tmp-"))
        if os.path.isdir(d)
        else []
    )


@pytest.mark.parametrize("stage,seed", [(s, k) for s in STAGES for k in SEEDS])
def test_kill_9_mid_shard_then_rerun(reference, tiny_corpus, tmp_path, stage, seed):
    """The build is stopped (a failpoint) with a shard claimed and its output written under
    its temporary name, not yet published; proven so, then every process is SIGKILLed, the
    claim and the temp file are shown still there, and the rerun must give the reference."""
    shard = random.Random(f"{stage}:{seed}").choice(["00000", "00001", "00002", "00003"])
    markers_rel, out_rel = TARGETS[stage]
    claim = tmp_path / markers_rel / f"{shard}.running.json"
    output = tmp_path / out_rel.format(shard=shard)
    run, i2e = tmp_path / "run", tmp_path / "i2e"
    for done in BEFORE[stage]:
        shutil.copytree(reference["run"] / done, run / done)
    log = tmp_path / "build.log"
    env = {**os.environ, "MOFI_FAILPOINTS": f"publish:{out_rel.format(shard=shard)}=pause"}
    with open(log, "w") as err:
        proc = subprocess.Popen(_build(tiny_corpus, run, i2e), stdout=subprocess.DEVNULL,
                                stderr=err, env=env, start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    try:  # (for ner and vocab the failpoint's own message goes to Spark's log)
        while not (claim.exists() and _temps_of(output)):
            assert proc.poll() is None, f"ended before the failpoint: {log.read_text()[-2000:]}"
            assert time.time() < deadline, "the failpoint was never reached"
            time.sleep(0.1)
        time.sleep(1.0)  # held there, not passing through: still claimed, still unpublished
        temps = _temps_of(output)
        held = json.loads(claim.read_text())
        assert held["shard"] == shard and temps and not output.exists()
    finally:
        killed = _kill_group(proc) if proc.poll() is None else 0
    assert killed >= 2  # the driver and the process that was writing (a worker, an executor)
    assert claim.exists() and json.loads(claim.read_text())["token"] == held["token"]
    assert _temps_of(output) == temps and not output.exists()  # the kill left them as they were
    rerun = subprocess.run(_build(tiny_corpus, run, i2e), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _digests(run, i2e) == reference["digests"]
    _assert_clean(str(tmp_path))  # no temp file, no claim left; pairs in = kept + dropped
    assert _assert_unique_keys(i2e) == reference["n"]


def test_two_builds_on_one_root(reference, tiny_corpus, tmp_path):
    """The second is refused at once, naming the first; the first is not disturbed."""
    run, i2e = tmp_path / "run", tmp_path / "i2e"
    first = subprocess.Popen(
        _build(tiny_corpus, run, i2e), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lease = os.path.join(_marker_dir(run / "ner", "ner"), "_lease.json")
    deadline = time.time() + 120
    while not os.path.exists(lease) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(_build(tiny_corpus, run, i2e), capture_output=True, text=True)
    assert second.returncode == 1
    assert "is held by" in second.stderr and f"pid {first.pid} (ner" in second.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    assert _digests(run, i2e) == reference["digests"]
    _assert_clean(str(tmp_path))


def test_two_writers_into_one_output(reference, tiny_corpus, tmp_path):
    """The second `mofi write` runs while the first is held mid-shard (a failpoint: shard
    claimed, tar written under its temp name): it is refused at once, naming the first;
    the first, let go, writes the reference bytes."""
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    i2e = tmp_path / "i2e"
    cmd = _cli("write", "--raw", tiny_corpus["raw"], "--run", str(run), "--out", str(i2e),
               "--config", "cpu_test", "--no-progress")  # fmt: skip
    go, log = tmp_path / "go", tmp_path / "first.log"
    env = {**os.environ, "MOFI_FAILPOINTS": f"publish:i2e/00001.tar=wait:{go}"}
    with open(log, "w") as err:
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    claim = i2e / "_markers" / "write" / "00001.running.json"
    deadline = time.time() + 300
    while not ("failpoint publish" in log.read_text() and claim.exists()):
        assert first.poll() is None, log.read_text()[-2000:]
        assert time.time() < deadline, "the first writer never reached its failpoint"
        time.sleep(0.05)
    assert _temps_of(i2e / "00001.tar")  # mid-shard, proven
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert first.poll() is None  # the first was still there, held, the whole time
    go.touch()
    assert first.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert second.returncode == 1, second.stderr[-2000:]
    assert "is held by" in second.stderr and f"pid {first.pid} " in second.stderr, second.stderr
    assert _digests(i2e) == {k: v for k, v in reference["digests"].items() if k.startswith("i2e/")}
    _assert_clean(str(tmp_path))


def _tree(proc: subprocess.Popen) -> set[int]:
    p = psutil.Process(proc.pid)
    return {proc.pid, *(c.pid for c in p.children(recursive=True))}


def _result_line(out: str, stage: str) -> dict:
    line = next(x for x in out.splitlines() if x.startswith(f"{stage}: {{"))
    return json.loads(line[len(stage) + 2 :])


def test_mapped_score_batches_share_the_stage(reference, tiny_corpus, tmp_path):
    """Two `mofi score --shards` at once (as two mapped Airflow tasks), overlapping on one
    shard. Both are held at a failpoint with a shard claimed each, so the overlap is seen,
    not hoped for; then each shard is scored by exactly one of them and equals the reference."""
    run = tmp_path / "run"
    shutil.copytree(reference["run"] / "ner", run / "ner")
    shutil.copytree(reference["run"] / "scorer", run / "scorer")
    base = _cli("score", "--raw", tiny_corpus["raw"], "--kb", tiny_corpus["kb"], "--run",
                str(run), "--config", "cpu_test", "--no-progress")  # fmt: skip
    prep = subprocess.run([*base, "--prepare"], capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr[-2000:]
    go = tmp_path / "go"
    procs, logs = {}, {}
    for name, shards, held in (("a", "00000,00001,00002", "00001"), ("b", "00002,00003", "00003")):
        env = {**os.environ, "MOFI_FAILPOINTS": f"publish:score/{held}.parquet=wait:{go}"}
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "w") as err:
            procs[name] = subprocess.Popen([*base, "--shards", shards], env=env,
                                           stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    deadline = time.time() + 600
    while not all("failpoint publish" in logs[n].read_text() for n in procs):
        for n, p in procs.items():
            assert p.poll() is None, (
                f"{n} ended before its failpoint: {logs[n].read_text()[-2000:]}"
            )
        assert time.time() < deadline, "the failpoints were never reached"
        time.sleep(0.1)
    # the overlap, seen at one instant: each process holds its claim, neither is published
    store = markers.MarkerStore(str(run / "score"), "score")
    held = {
        n: json.loads(open(store._uri(s, "running")).read())
        for n, s in (("a", "00001"), ("b", "00003"))
    }
    assert held["a"]["pid"] in _tree(procs["a"]) and held["b"]["pid"] in _tree(procs["b"])
    go.touch()
    outs = {n: (p.wait(timeout=600), p.stdout.read()) for n, p in procs.items()}
    results = {n: _result_line(out, "score") for n, (_, out) in outs.items()}
    for n, (rc, _) in outs.items():
        busy = results[n]["busy"]
        assert (rc == 0 or busy) and set(busy) <= {"00002"}, (n, rc, results[n])
    # exactly once: one writer per shard in its done marker, the shared shard busy for the other
    writers = {s: json.loads(open(store._uri(s, "done")).read())["writer"] for s in
               ("00000", "00001", "00002", "00003")}  # fmt: skip
    assert (
        writers["00001"]["pid"] == held["a"]["pid"] and writers["00003"]["pid"] == held["b"]["pid"]
    )
    shared = writers["00002"]["pid"]
    winner = "a" if shared == held["a"]["pid"] else "b"
    assert shared == held[winner]["pid"]
    loser = "b" if winner == "a" else "a"
    assert set(results[loser]["busy"]) == {"00002"} and not results[winner]["busy"]
    # and from their own timestamps: both held claims at the same time
    a, b = writers["00001"], writers["00003"]
    assert max(a["claimed_at"], b["claimed_at"]) < min(a["done_at"], b["done_at"])
    for sid in ("00000", "00001", "00002", "00003"):
        got = open(run / "score" / f"{sid}.parquet", "rb").read()
        assert hashlib.sha256(got).hexdigest() == reference["digests"][f"run/score/{sid}.parquet"]


def test_damaged_outputs_behind_done_markers_are_found_and_redone(reference, tiny_corpus, tmp_path):
    top = tmp_path
    run, i2e = top / "run", top / "i2e"
    shutil.copytree(reference["run"], run)
    shutil.copytree(reference["i2e"], i2e)
    os.remove(run / "score" / "00001.parquet")
    os.remove(run / "labels" / "00002.parquet")  # forces the vocab job to run again
    tar = sorted(i2e.glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    # the reference was complete, so its stages are sealed (their summaries copied with it):
    # damage done behind the pipeline's back shows in a --verify read of every marker
    st = subprocess.run(_cli("status", "--verify", str(top)), capture_output=True, text=True)
    assert st.returncode == 1 and "INVALID" in st.stdout
    for shard, what in (("00001", "score"), ("00002", "labels"), (tar.stem, "write")):
        assert f"invalid {shard}" in st.stdout, (what, st.stdout)
    # training refuses the damaged version before any compute, instead of repeating samples
    train = subprocess.run(
        _cli(
            "train",
            "--i2e",
            str(i2e),
            "--out",
            str(top / "train"),
            "--config",
            "cpu_test",
            "--dry-run",
        ),
        capture_output=True,
        text=True,
    )
    assert train.returncode == 2 and "write marker recorded" in train.stderr
    rebuilt = subprocess.run(_build(tiny_corpus, run, i2e), capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert _digests(run, i2e) == reference["digests"]
    _assert_clean(str(top))
    assert json.loads((i2e / "sizes.json").read_text()) == json.loads(
        (reference["i2e"] / "sizes.json").read_text()
    )
