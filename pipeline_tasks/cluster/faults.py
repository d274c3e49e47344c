"""The three faults of the cluster run, each proven to have happened before recovery is
checked, and Spark's own record of where its tasks ran.

* :func:`kill_executor_host_during_ner`: while the ner job runs, a task runs on the worker
  host that is not the driver's: every process of that host is killed;
* :func:`kill_gpu_host_during_scoring`: while a scoring task holds a shard's claim on the
  ``gpu`` worker's host, every process of that host is killed;
* :func:`kill_a_torchrun_node`: after the first checkpoint is on S3, the torchrun agent and
  the ranks of one node are killed; the proof that no rank runs on is that every training
  process seen at the kill is gone.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import time
from typing import Any

from training.core import storage

from .hosts import Host


class FaultNotFired(RuntimeError):
    pass


def spark_events(hosts: list[Host], app_name: str | None = None) -> list[dict[str, Any]]:
    """Each Spark application's record (its event log, on the driver's host): its name, the
    driver's host, and every task's host and outcome."""
    apps = []
    for h in hosts:
        for path in sorted(glob.glob(os.path.join(h.work, "spark-events", "*"))):
            app: dict[str, Any] = {"driver_host": h.name, "log": path, "tasks": {}, "lost": []}
            for line in _lines(path):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue  # the line being written
                if not isinstance(ev, dict):
                    continue
                kind = ev.get("Event")
                if kind == "SparkListenerApplicationStart":
                    app["name"] = ev.get("App Name")
                elif kind in ("SparkListenerTaskStart", "SparkListenerTaskEnd"):
                    info = ev["Task Info"]
                    t = app["tasks"].setdefault(info["Task ID"], {"host": info["Host"]})
                    if kind == "SparkListenerTaskEnd":
                        t["end"] = ev.get("Task End Reason", {}).get("Reason", "")
                elif kind == "SparkListenerExecutorRemoved":
                    app["lost"].append(ev.get("Removed Reason", ""))
            if app_name is None or app.get("name") == app_name:
                apps.append(app)
    return apps


def host_of(hosts, name_or_address: str) -> Host | None:
    """The host a Spark record names (by hostname or address)."""
    return next((h for h in hosts if name_or_address in (h.name, h.address)), None)


def _lines(path: str):
    """The events of one log: a file, or Spark 4's rolling log folder (its event files)."""
    files = sorted(glob.glob(os.path.join(path, "events_*"))) if os.path.isdir(path) else [path]
    for name in files:
        try:
            with open(name, errors="replace") as f:
                yield from f
        except FileNotFoundError:  # renamed when the application ended
            continue


def kill_executor_host_during_ner(
    hosts: dict[str, Host], workers: list[str], ner_markers: str, driver_host, timeout_s=600
) -> dict[str, Any]:
    """Wait until an executor on a worker host other than the driver's (``driver_host()``:
    where the ner task runs) holds a ner shard (its running marker names that host), then
    kill every process of that host. Returns the proof."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        driver = driver_host()
        try:
            states = _markers(ner_markers)
        except FileNotFoundError:
            states = {}
        for shard in [s for s, st in states.items() if st == "running"]:
            try:
                rec = storage.read_json(storage.join(ner_markers, f"{shard}.running.json"))
            except FileNotFoundError:
                continue
            victim = hosts.get(rec.get("host", ""))
            if (
                driver in workers
                and victim is not None
                and victim.name in workers
                and victim.name != driver
            ):
                events = [a["log"] for a in spark_events([hosts[driver]], "mofi-ner")]
                pids = victim.kill_all()
                return {
                    "fault": "kill every process of a worker host during ner",
                    "host": victim.name,
                    "driver_host": driver,
                    "running_shard": shard,
                    "marker_holder": {k: rec.get(k) for k in ("host", "pid")},
                    "killed_pids": len(pids),
                    "processes_left": len(victim.pids()),
                    "at": time.time(),
                    "event_logs_before": events,
                }
        time.sleep(0.2)
    raise FaultNotFired("no ner shard ran on a worker host other than the driver's")


def ner_recovery(hosts: list[Host], fault: dict[str, Any]) -> dict[str, Any]:
    """Spark's record after the fault (the ner application's event log on the driver's host):
    tasks on the killed host that never ended or failed with their lost executor, and the
    hosts where tasks succeeded."""
    apps = [a for a in spark_events(hosts, "mofi-ner") if a["driver_host"] == fault["driver_host"]]
    apps = [a for a in apps if a["log"] not in fault["event_logs_before"]] or apps
    app = apps[-1]
    victim = next(h for h in hosts if h.name == fault["host"])
    on_victim = [t for t in app["tasks"].values() if host_of(hosts, t["host"]) is victim]
    return {
        "tasks_on_killed_host": len(on_victim),
        "killed_host_task_outcomes": sorted({t.get("end", "never ended") for t in on_victim}),
        "executors_lost": app["lost"],
        "succeeded_on": sorted(
            {
                host_of(hosts, t["host"]).name
                for t in app["tasks"].values()
                if t.get("end") == "Success" and host_of(hosts, t["host"]) is not None
            }
        ),
    }


def _markers(store_dir: str) -> dict[str, str]:
    """shard -> state of the marker files under a stage's marker folder."""
    out = {}
    for uri in storage.list_files(store_dir, suffix=".json"):
        name = storage.basename(uri)
        if name.startswith("_"):
            continue
        shard, state = name[: -len(".json")].rsplit(".", 1)
        if state == "done" or shard not in out:
            out[shard] = state
    return out


def kill_gpu_host_during_scoring(
    host: Host, score_markers: str, timeout_s: float = 900
) -> dict[str, Any]:
    """Wait until a scoring process on ``host`` holds a shard's claim, then kill every
    process of ``host``. Returns the proof: the claim (still there, naming the dead holder)
    and the shards already done."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            states = _markers(score_markers)
        except FileNotFoundError:
            states = {}
        running = [s for s, st in states.items() if st == "running"]
        # a shard already done, another claimed: the retry must keep the one, redo the other
        if running and any(st == "done" for st in states.values()):
            claim = storage.read_json(storage.join(score_markers, f"{running[0]}.running.json"))
            if claim.get("host") == host.name:
                # frozen, the host cannot finish the shard between this check and the kill
                # (a shard done in that window left no claim to prove the fault by)
                frozen = host.send_signal(signal.SIGSTOP)
                if _markers(score_markers).get(running[0]) != "running":
                    host.send_signal(signal.SIGCONT, frozen)  # it finished: the next claim
                    continue
                pids = host.kill_all()
                after = _markers(score_markers)
                return {
                    "fault": "kill every process of the gpu worker host during scoring",
                    "host": host.name,
                    "claimed_shard": running[0],
                    "claim_holder": {k: claim.get(k) for k in ("host", "pid")},
                    "claim_still_there": after.get(running[0]) == "running",
                    "done_before": sorted(s for s, st in after.items() if st == "done"),
                    "killed_pids": len(pids),
                    "processes_left": len(host.pids()),
                    "at": time.time(),
                }
        time.sleep(0.2)
    raise FaultNotFired("no scoring claim appeared on the gpu host")


def _training_pids(host: Host) -> dict[int, str]:
    out = {}
    for pid in host.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "torch.distributed.run" in cmd or "training.train" in cmd:
            out[pid] = cmd
    return out


def kill_a_torchrun_node(
    hosts: list[Host], victim: Host, checkpoints: str, timeout_s: float = 900, gone_s: float = 180
) -> dict[str, Any]:
    """After the first checkpoint is on S3, kill the torchrun agent and ranks of ``victim``;
    prove that every training process seen at that moment (on every host) is gone."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            ckpts = storage.list_files(checkpoints, suffix=".pt")
        except FileNotFoundError:
            ckpts = []
        seen = {h.name: _training_pids(h) for h in hosts}
        if ckpts and seen[victim.name] and all(seen[h.name] for h in hosts if h.name != "head"):
            victim.send_signal(signal.SIGKILL, seen[victim.name])
            t0 = time.time()
            everyone = {(h, pid) for h, pids in seen.items() for pid in pids}
            while time.time() - t0 < gone_s:
                alive = {(h, p) for h, p in everyone if os.path.exists(f"/proc/{p}")}
                if not alive:
                    break
                time.sleep(0.5)
            return {
                "fault": "kill one torchrun node mid-training",
                "host": victim.name,
                "checkpoints_before": sorted(storage.basename(c) for c in ckpts),
                "killed_pids": len(seen[victim.name]),
                "training_processes_at_kill": {h: len(p) for h, p in seen.items()},
                "all_ranks_gone_after_s": round(time.time() - t0, 1) if not alive else None,
                "at": time.time(),
            }
        time.sleep(0.2)
    raise FaultNotFired("training never had a checkpoint on S3 while both nodes ran")
