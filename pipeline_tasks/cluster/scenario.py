"""`make cluster`: the deployment's shape on this one machine, the whole pipeline across it,
three faults, every check measured, a report.

1. References first, locally and alone on the CPUs: the inputs (KB, corpus, evaluation
   folder), `mofi build-i2e` on them, and a 1-node x 2-process training on that I2E.
2. Hosts and services up (``hosts``, ``stack``: docker/compose.yaml's services), the inputs
   uploaded to S3: the only storage the hosts share.
3. ``mofi_build_i2e`` triggered over REST with s3:// params; during ner every process of the
   worker host that is not the driver's is killed, during scoring every process of the
   ``gpu`` worker's host (both hosts are started again after).
4. Every host's local work folder is removed; the build's ``mofi_i2e`` asset triggers
   ``mofi_train`` with 2 nodes x 1 process (one per worker host, c10d rendezvous across
   hosts, checkpoints on S3); one torchrun node is killed after the first checkpoint.
5. The checks: the I2E on S3 is byte-identical to the local one; the training curve and
   weights equal the 1-node x 2-process run's; the results rows are in Postgres; `mofi
   status` and the dashboard show every stage complete; where each Spark task and each
   Airflow task ran. Everything goes to ``OUT/report.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any
from unittest import mock

from training.core import storage

from . import faults
from . import hosts as hosts_mod
from .report import stage_seconds
from .services import ALIASES, PLACEMENT, REPO
from .stack import Stack, env_file_values

BUILD, TRAIN = "mofi_build_i2e", "mofi_train"
VERSION = "cluster"
RDZV_PORT = 29400


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] cluster: {msg}", flush=True)


@contextlib.contextmanager
def one_thread():
    """One thread, as on the hosts: on some CPUs the I2E's similarities depend on it (1e-5)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.dict(os.environ, OMP_NUM_THREADS="1"):
            yield
    finally:
        torch.set_num_threads(before)


def _mofi(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_tasks.cli", "-q", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"mofi {' '.join(args)} failed: {proc.stderr[-3000:]}")
    return proc


class Settings:
    def __init__(
        self,
        out: str,
        pairs: int = 128,
        shard_size: int = 16,
        stamps: str | None = None,
        kb_source: str | None = None,
        epochs: int = 8,
        keep: bool = False,
    ):
        self.out = os.path.abspath(out)
        self.pairs, self.shard_size, self.stamps = pairs, shard_size, stamps
        self.kb_source, self.epochs, self.keep = kb_source, epochs, keep

    @property
    def local(self) -> str:
        return os.path.join(self.out, "local")


# ------------------------------------------------------------------ 1. references


def local_references(s: Settings) -> dict[str, Any]:
    """Inputs, the local build and the 1-node x 2-process training, with their stage times."""
    loc = s.local
    kb_args = ["--source", s.kb_source] if s.kb_source else []
    _mofi("kb", "--out", f"{loc}/kb", "--config", "cpu_test", *kb_args)
    corpus = ["--pairs", str(s.pairs), "--shard-size", str(s.shard_size), "--no-progress"]
    if s.stamps:
        corpus += ["--stamps", s.stamps]
    _mofi("corpus", "--out", f"{loc}/raw", "--kb", f"{loc}/kb", "--config", "cpu_test", *corpus)
    t0 = time.time()
    from pipeline_tasks import recipes
    from pipeline_tasks.build import build_i2e

    with one_thread():
        res = build_i2e(
            recipes.get("cpu_test"), f"{loc}/raw", f"{loc}/kb", f"{loc}/i2e_run", f"{loc}/i2e",
            progress=False,
        )  # fmt: skip
    stage_s = {k: v["stage_seconds"] for k, v in res.items()}
    build_s = time.time() - t0
    t0 = time.time()
    _mofi(
        "train", "--i2e", f"{loc}/i2e", "--out", f"{loc}/train", "--config", "cpu_test",
        "--nproc-per-node", "2", "--epochs", str(s.epochs),
    )  # fmt: skip
    return {"stage_seconds": stage_s, "build_s": build_s, "train_s": time.time() - t0}


# ------------------------------------------------------------------ 2. the deployment


def deployment_env(s: Settings, hosts: dict[str, hosts_mod.Host]) -> dict[str, str]:
    """The env file's values for this run: the pipeline's settings for a small corpus on two
    cores, training on both worker hosts."""
    env = env_file_values()
    env.update(
        MOFI_BUILD_CONFIG="cpu_test",
        MOFI_TRAIN_CONFIG="cpu_test",
        MOFI_TRAIN_NNODES="2",
        MOFI_TRAIN_NPROC_PER_NODE="1",
        MOFI_TRAIN_EPOCHS=str(s.epochs),
        MOFI_TRAIN_RDZV_ENDPOINT=f"worker1:{RDZV_PORT}",
        MOFI_EVAL_BASELINE="0",
    )
    return env


def s3_env(stack: Stack) -> dict[str, str]:
    e = stack.env
    return {
        "AWS_ENDPOINT_URL": f"http://{stack.hosts['head'].address}:{stack.ports['s3']}",
        "AWS_ACCESS_KEY_ID": e["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": e["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": e.get("AWS_DEFAULT_REGION", "us-east-1"),
    }


def upload(local: str, uri: str) -> int:
    n = 0
    for d, _, files in os.walk(local):
        for f in files:
            if "_markers" in d or ".tmp-" in f:
                continue
            path = os.path.join(d, f)
            storage.publish_file(path, storage.join(uri, os.path.relpath(path, local)))
            n += 1
    return n


# ------------------------------------------------------------------ 3.-4. the runs


def task_hosts(client, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    return [
        {
            "dag": dag_id,
            "task": t["task_id"],
            "map_index": t.get("map_index", -1),
            "try": t.get("try_number"),
            "state": t.get("state"),
            "hostname": t.get("hostname"),
            "seconds": t.get("duration"),
        }
        for t in client.task_instances(dag_id, run_id)
    ]


def wait_state(client, dag_id: str, run_id: str, task: str, states: set[str], timeout_s: float):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        tis = [t for t in client.task_instances(dag_id, run_id) if t["task_id"] == task]
        if tis and all(t.get("state") in states for t in tis):
            return tis
        time.sleep(1)
    raise RuntimeError(f"{dag_id}.{task} not in {states} after {timeout_s:.0f}s")


def run_build(s: Settings, stack: Stack, client, bucket: str) -> dict[str, Any]:
    hosts = stack.hosts
    conf = {
        "root": f"s3://{bucket}/i2e",
        "raw": f"s3://{bucket}/raw",
        "kb": f"s3://{bucket}/kb",
        "config": "cpu_test",
        "version": VERSION,
        "score_batch_shards": 2,
    }
    run = client.trigger(BUILD, conf)
    run_id = run["dag_run_id"]
    _say(f"triggered {BUILD} over REST with s3:// params ({run_id})")
    out: dict[str, Any] = {"run_id": run_id, "conf": conf, "faults": []}

    def driver_host() -> str:
        tis = [t for t in client.task_instances(BUILD, run_id) if t["task_id"] == "ner"]
        return tis[0].get("hostname") or "" if tis and tis[0].get("state") == "running" else ""

    ner_markers = f"s3://{bucket}/i2e/v={VERSION}/i2e_run/ner/_markers/ner"
    ner = faults.kill_executor_host_during_ner(
        hosts, ["worker1", "worker2"], ner_markers, driver_host
    )
    _say(f"fault 1: killed every process of {ner['host']} during ner ({ner['killed_pids']} pids)")
    stack.start_host(ner["host"])
    wait_state(client, BUILD, run_id, "ner", {"success", "failed", "upstream_failed"}, 900)
    ner.update(faults.ner_recovery([hosts["worker1"], hosts["worker2"]], ner))
    out["faults"].append(ner)
    markers = f"s3://{bucket}/i2e/v={VERSION}/i2e_run/score/_markers/score"
    sc = faults.kill_gpu_host_during_scoring(hosts["worker2"], markers)
    _say(
        f"fault 2: killed every process of worker2 holding the claim of shard {sc['claimed_shard']}"
    )
    stack.start_host("worker2")
    done = client.wait(BUILD, run_id, 1800, poll_s=3)
    out["state"] = done["state"]
    from pipeline_tasks.runtime import markers as markers_mod

    store = markers_mod.MarkerStore(f"s3://{bucket}/i2e/v={VERSION}/i2e_run/score", "score")
    recs = store.read_all()
    sc["after"] = {
        "claimed_shard_done_by": recs.get(sc["claimed_shard"], {}).get("stats", {}).get("host"),
        "every_shard_done_once": all(r["state"] == "done" for r in recs.values()),
        "done_before_kept": all(
            recs[sh]["stats"]["finished_at"] < sc["at"] for sh in sc["done_before"]
        ),
    }
    out["faults"].append(sc)
    out["tasks"] = task_hosts(client, BUILD, run_id)
    return out


def wipe_local_work(stack: Stack) -> dict[str, Any]:
    """Every host's local working files of the build (Spark scratch, job specs, scorer
    hand-off files) removed before training: nothing a later stage needs is on a disk."""
    removed = {}
    for name, h in stack.hosts.items():
        gone = []
        for path in (os.path.join(h.tmp, "mofi-work"), os.path.join(h.work, "spark-local")):
            if os.path.exists(path):
                shutil.rmtree(path)
                gone.append(path)
        removed[name] = gone
    return removed


def run_training(s: Settings, stack: Stack, client, after: float, bucket: str) -> dict[str, Any]:
    run = client.asset_triggered_run(TRAIN, after, timeout_s=300)
    run_id = run["dag_run_id"]
    _say(f"the mofi_i2e asset triggered {TRAIN} ({run_id}) with 2 nodes")
    out_dir = f"s3://{bucket}/train/{run_id.replace(':', '_').replace('+', '_')}"
    fault = faults.kill_a_torchrun_node(
        [stack.hosts["worker1"], stack.hosts["worker2"]],
        stack.hosts["worker2"],
        f"{out_dir}/checkpoints",
    )
    _say(f"fault 3: killed the torchrun node on worker2 after {fault['checkpoints_before']}")
    done = client.wait(TRAIN, run_id, 1800, poll_s=3)
    fault["resumed"] = resumed_from(stack, run_id)
    return {
        "run_id": run_id,
        "state": done["state"],
        "out": out_dir,
        "faults": [fault],
        "tasks": task_hosts(client, TRAIN, run_id),
    }


def resumed_from(stack: Stack, run_id: str) -> list[str]:
    """What the retried train tasks' logs say they resumed from (each node's launcher prints
    "resuming at step N" when OUT already holds a checkpoint)."""
    import glob
    import re

    found = []
    for h in stack.hosts.values():
        pattern = os.path.join(h.work, "airflow", "logs", "dag_id=mofi_train", f"run_id={run_id}",
                               "task_id=train", "*", "attempt=[2-9].log")  # fmt: skip
        for path in glob.glob(pattern):
            with open(path, errors="replace") as f:
                m = re.search(r"resuming at step (\d+)", f.read())
            if m:
                found.append(f"{h.name}: step {m.group(1)}")
    return sorted(found)


# ------------------------------------------------------------------ 5. checks


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for uri in storage.list_files(root):
        name = storage.basename(uri)
        if name.endswith((".tar", ".parquet")) or name == "sizes.json":
            out[name] = storage.read_bytes(uri)
    return out


def curve(uri: str) -> list[tuple]:
    text = storage.read_text(uri)
    rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    keys = ("loss", "loss_class", "loss_contrast", "lr")
    return [(r["step"], *[r.get(k) for k in keys]) for r in rows]


def same_weights(a: str, b: str) -> bool:
    import torch

    from training.model import load_checkpoint

    pa, pb = load_checkpoint(a), load_checkpoint(b)
    sa, sb = pa["state_dict"], pb["state_dict"]
    heads = [pa["extra"].get("entity_head"), pb["extra"].get("entity_head")]
    return (
        sa.keys() == sb.keys()
        and all(torch.equal(sa[k], sb[k]) for k in sa)
        and (heads[0] is None) == (heads[1] is None)
        and (heads[0] is None or torch.equal(heads[0], heads[1]))
    )


def checks(s: Settings, stack: Stack, build: dict, train: dict, bucket: str) -> dict[str, Any]:
    loc = s.local
    i2e_s3 = _files(f"s3://{bucket}/i2e/v={VERSION}/i2e")
    i2e_local = _files(f"{loc}/i2e")
    out: dict[str, Any] = {
        "i2e_files": len(i2e_s3),
        "i2e_identical": bool(i2e_s3) and i2e_s3 == i2e_local,
        "i2e_differing_files": sorted(
            n for n in set(i2e_s3) | set(i2e_local) if i2e_s3.get(n) != i2e_local.get(n)
        ),
    }
    ref_curve = curve(f"{loc}/train/metrics.jsonl")
    got_curve = curve(f"{train['out']}/metrics.jsonl")
    out["curve_steps"] = len(got_curve)
    out["curve_identical"] = bool(ref_curve) and got_curve == ref_curve
    out["model_identical"] = same_weights(f"{loc}/train/model.pt", f"{train['out']}/model.pt")
    out["results_rows"] = results_rows(stack, train["run_id"])
    status = _mofi("status", f"s3://{bucket}/i2e/v={VERSION}", "--json", check=False)
    stages = json.loads(status.stdout)["stages"] if status.stdout.strip() else []
    out["status"] = {f"{st['where']}:{st['stage']}": st["complete"] for st in stages}
    out["status_all_complete"] = bool(stages) and all(out["status"].values())
    out["dashboard_all_complete"] = dashboard_complete(stack, bucket)
    return out


def results_rows(stack: Stack, run_id: str) -> int:
    from evaluation import results

    e = stack.services[("head", "postgres")].env
    url = (
        f"postgresql+psycopg2://{e['POSTGRES_USER']}:{e['POSTGRES_PASSWORD']}@"
        f"{stack.hosts['head'].address}:5432/{e['MOFI_RESULTS_DB']}"
    )
    return sum(1 for r in results.read_results(url) if r["run_id"].startswith(run_id))


def dashboard_complete(stack: Stack, bucket: str) -> bool:
    """The dashboard, on the head, over the S3 root: every stage of the version complete."""
    import secrets
    import urllib.request

    head = stack.hosts["head"]
    token = secrets.token_hex(16)  # bound beyond loopback: the dashboard wants a token
    env = {**stack.base_env(head), **stack.services[("head", "airflow-apiserver")].env,
           "MOFI_DASHBOARD_TOKEN": token}  # fmt: skip
    p = head.popen(
        [sys.executable, "-m", "pipeline_tasks.cli", "-q", "dashboard", "--roots",
         f"s3://{bucket}/i2e", "--host", head.address, "--port", "8765"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(OSError, ValueError):
                req = urllib.request.Request(
                    f"http://{head.address}:8765/api/runs",
                    headers={"Authorization": f"Bearer {token}"},
                )
                snap = json.loads(urllib.request.urlopen(req, timeout=30).read())
                stages = [st for r in snap["runs"] for st in r["stages"]]
                return bool(stages) and all(st["complete"] for st in stages)
            time.sleep(1)
        return False
    finally:
        p.kill()
        p.wait()


def spark_hosts(stack: Stack) -> dict[str, list[str]]:
    """Per Spark application (ner, vocab): the hosts whose executors finished tasks."""
    hosts = [stack.hosts["worker1"], stack.hosts["worker2"]]
    out: dict[str, set[str]] = {}
    for app in faults.spark_events(hosts):
        for t in app["tasks"].values():
            h = faults.host_of(hosts, t["host"])
            if t.get("end") == "Success" and h is not None:
                out.setdefault(app.get("name", "?"), set()).add(h.name)
    return {k: sorted(v) for k, v in out.items()}


# ------------------------------------------------------------------ the whole run


def run(s: Settings) -> dict[str, Any]:
    os.makedirs(s.out, exist_ok=True)
    report: dict[str, Any] = {"started_at": time.time()}
    hosts_mod.cleanup()
    _say("references: inputs, the local build and a 1-node x 2-process training")
    report["local"] = local_references(s)
    hs = hosts_mod.make_hosts(list(PLACEMENT), s.out)
    stack = None
    try:
        hosts_mod.up(hs, ALIASES)
        report["hosts"] = [{"name": h.name, "address": h.address} for h in hs]
        stack = Stack(hs, deployment_env(s, {h.name: h for h in hs}))
        t0 = time.time()
        stack.up()
        report["up_s"] = round(time.time() - t0, 1)
        _say(f"services up on {', '.join(h.name for h in hs)} in {report['up_s']}s")
        os.environ.update(s3_env(stack))
        storage.reset_clients()
        bucket = stack.env.get("MOFI_S3_BUCKET", "mofi")
        for name in ("kb", "raw", "eval"):
            upload(os.path.join(s.local, name), f"s3://{bucket}/{name}")
        client = _client(stack)
        client.wait_for_dags([BUILD, TRAIN], timeout_s=300)
        for d in (BUILD, TRAIN):
            client.set_paused(d, False)
        t_build = time.time()
        build = run_build(s, stack, client, bucket)
        report["build"] = build
        if build["state"] != "success":
            raise RuntimeError(f"{BUILD} ended {build['state']}")
        report["wiped_before_training"] = wipe_local_work(stack)
        train = run_training(s, stack, client, t_build, bucket)
        report["train"] = train
        if train["state"] != "success":
            raise RuntimeError(f"{TRAIN} ended {train['state']}")
        report["faults"] = build["faults"] + train["faults"]
        report["task_hosts"] = build["tasks"] + train["tasks"]
        report["spark_executor_hosts"] = spark_hosts(stack)
        report.update(checks(s, stack, build, train, bucket))
        report["stage_seconds"] = stage_seconds(report)
        stack.stop_sampling()
        report["peak_rss_bytes"] = stack.peak_rss
        report["host_work_folders"] = {h.name: sorted(os.listdir(h.work)) for h in hs}
        if s.keep:
            _say(keep_message(stack))
    finally:
        report["finished_at"] = time.time()
        with open(os.path.join(s.out, "report.json"), "w") as f:
            json.dump(report, f, indent=2, sort_keys=True, default=str)
        if not s.keep:
            removed = hosts_mod.cleanup()
            _say(f"stopped everything; removed {len(removed)} namespaces and links")
    return report


def keep_message(stack: Stack) -> str:
    """Every address and login of the running deployment (KEEP=1)."""
    c, e, head = stack.credentials(), stack.env, stack.hosts["head"].address
    pg = stack.services[("head", "postgres")].env
    return "\n".join(
        [
            "left running (stop it: python -m pipeline_tasks.cli cluster --stop):",
            f"  Airflow UI and REST  {c['api']}  user {c['user']}  password {c['password']}",
            f"  S3 (SeaweedFS)       {os.environ['AWS_ENDPOINT_URL']}  key {e['AWS_ACCESS_KEY_ID']}"
            f"  secret {e['AWS_SECRET_ACCESS_KEY']}",
            f"  Spark master         spark://{head}:7077  UI http://{head}:8081",
            f"  Postgres             {head}:5432  user {pg['POSTGRES_USER']}  password "
            f"{pg['POSTGRES_PASSWORD']}  databases {pg['POSTGRES_DB']}, {pg['MOFI_RESULTS_DB']}",
            f"  Redis                {head}:6379  password {e['REDIS_PASSWORD']}",
            "  hosts                "
            + ", ".join(f"{h.name} {h.address}" for h in stack.hosts.values()),
            "  a shell on a host:   ip netns exec mofi-c-worker1 bash",
        ]
    )


def _client(stack: Stack):
    from pipeline_tasks.orchestration.client import AirflowClient

    c = stack.credentials()
    return AirflowClient(c["api"], c["user"], c["password"])
