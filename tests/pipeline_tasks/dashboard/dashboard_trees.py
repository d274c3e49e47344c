"""Helpers writing marker trees with the real MarkerStore, as stages and trainers leave them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pipeline_tasks.runtime import markers

DOMAINS = ("landmarks", "inat", "sketch")


def write_done(store: markers.MarkerStore, shard: str, n_in: int, n_out: int, drops=None, t0=None):
    """A done marker vouching for a real output file (so status does not call it invalid)."""
    out = os.path.join(store.root, f"{shard}.parquet")
    os.makedirs(store.root, exist_ok=True)
    with open(out, "wb") as f:
        f.write(b"x" * (100 + n_out))
    t0 = time.time() - 60 if t0 is None else t0
    st = markers.ShardStats(
        n_in=n_in,
        n_out=n_out,
        drops=dict(drops or {}),
        duration_s=2.0,
        started_at=t0,
        finished_at=t0 + 2.0,
        host="testhost",
    )
    markers.record_outputs(st, store.root, [out])
    store.mark_done(shard, st)
    return out


def dead_pid() -> int:
    """The pid of a process that has exited (a claim it held is stale)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_claim(store: markers.MarkerStore, shard: str, pid: int, heartbeat_at: float) -> None:
    """A running marker as another process left it (no heartbeat thread in this one)."""
    import socket

    rec = {
        "shard": shard,
        "host": socket.gethostname(),
        "pid": pid,
        "proc_start": 0,
        "started_at": heartbeat_at - 5,
        "heartbeat_at": heartbeat_at,
        "token": f"t-{shard}",
    }
    os.makedirs(store.dir, exist_ok=True)
    with open(os.path.join(store.dir, f"{shard}.running.json"), "w") as f:
        json.dump(rec, f)


def write_training(folder, steps: int, start: int = 1) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        for i in range(start, start + steps):
            f.write(
                json.dumps(
                    {
                        "step": i,
                        "loss": 6.0 - 0.01 * i,
                        "loss_class": 4.0 - 0.01 * i,
                        "loss_contrast": 2.0,
                        "lr": 1e-3,
                        "scale": 14.3,
                        "samples_per_s": 16.0 + i % 3,
                        "elapsed_s": 2.0 * i,
                    }
                )
                + "\n"
            )
    cfg = {
        "name": "demo",
        "epochs": 1,
        "max_steps": 0,
        "data": {"batch_size": 32},
        "dist": {"nproc_per_node": 2, "nnodes": 1},
        "loss": {"mode": "multitask"},
        "model": {"image_tower": "efficientnet-lite0"},
    }
    with open(os.path.join(folder, "train.config.json"), "w") as f:
        json.dump(cfg, f)
