"""What one mapped scoring task costs Airflow, at 64, 256 and 1,024 mapped tasks.

    .venv/bin/python tests/benchmarks/bench_map_size.py [--tasks 64 256 1024] [--slots 2]

A local Airflow (the services `make airflow-up` runs: LocalExecutor, SQLite; here with the
executor's parallelism and the ``gpu`` pool at ``--slots``, a host with 8 devices) loads a DAG that is the build DAG's scoring fan-out: ``score_batches`` reads a
score plan of N tiny shards with the build DAG's own ``dag_tasks.shard_batches`` (one shard
per batch), and a ``@task.bash`` in the ``gpu`` pool is mapped over the batches. The mapped
command does no work (``true``), so every second measured is Airflow's: scheduling, the
executor's start of the task, the task runner's calls to the execution API, the metadata
writes. A real score task adds its own process start-up (the model, the entity matrix), which
the score stage records as ``startup_s``; ``--score-startup`` folds it in when the batch
size is chosen.

Prints per map size: the wall time of the fan-out per mapped task, how long the scheduler
took to create the mapped task instances, the median waits (scheduled -> queued -> running),
the CPU seconds per mapped task of the scheduler, of the api-server and of the task processes,
and the metadata DB's growth per mapped task. Then the smallest batch (shards per mapped task)
whose fixed cost (Airflow's and the score worker's start-up) is at most ``--overhead`` of the
task at the per-shard scoring time given, and the batch the 1,024-task cap forces at
110,000 shards. ``--rechoose RESULT`` recomputes the batch from a saved result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

DAG_ID = "mofi_map_bench"
DAG = textwrap.dedent(
    '''
    """The build DAG's scoring fan-out alone (tests/benchmarks/bench_map_size.py)."""
    from airflow.sdk import Param, dag, task

    @dag(
        dag_id="mofi_map_bench",
        schedule=None,
        catchup=False,
        params={"run": Param("", type="string"), "batch_shards": Param(1, type="integer")},
    )
    def mofi_map_bench():
        @task
        def score_batches(run_uri: str, batch_shards: str) -> list[str]:
            from pipeline_tasks.orchestration import dag_tasks

            return dag_tasks.shard_batches(run_uri, int(batch_shards))

        @task.bash(pool="gpu")
        def score(shards: str) -> str:
            return "true"

        batches = score_batches("{{ params.run }}", "{{ params.batch_shards }}")
        score.expand(shards=batches)

    mofi_map_bench()
    '''
)


def _ts(v: str | None) -> float | None:
    if not v:
        return None
    return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each service's own process, and of all their descendants (the task
    processes: alive ones, plus the finished ones their parents have reaped)."""
    import psutil

    out = {}
    tasks = 0.0
    for name, pid in pids.items():
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            out[name] = t.user + t.system
            tasks += t.children_user + t.children_system
            for c in p.children(recursive=True):
                with_c = c.cpu_times()
                tasks += with_c.user + with_c.system + with_c.children_user + with_c.children_system
        except psutil.NoSuchProcess:
            out[name] = float("nan")
    out["tasks"] = tasks
    return out


def _db_bytes(home: str) -> int:
    return sum(
        os.path.getsize(os.path.join(home, f))
        for f in ("airflow.db", "airflow.db-wal")
        if os.path.exists(os.path.join(home, f))
    )


def measure(af, client, work: str, n: int, pids: dict[str, int]) -> dict:
    from pipeline_tasks.runtime.layout import SCORE, RunLayout

    run = os.path.join(work, f"run_{n}")
    RunLayout(run).store(SCORE).write_plan([f"{i:06d}" for i in range(n)])
    db0, cpu0 = _db_bytes(af.home), _cpu(pids)
    t0 = time.time()
    dr = client.trigger(DAG_ID, {"run": run, "batch_shards": 1})
    state = client.wait(DAG_ID, dr["dag_run_id"], timeout_s=3 * 3600, poll_s=2.0)
    wall = time.time() - t0
    cpu1 = _cpu(pids)
    if state.get("state") != "success":
        raise RuntimeError(f"map of {n}: the run ended {state.get('state')}")
    con = sqlite3.connect(f"file:{af.home}/airflow.db?mode=ro", uri=True)
    rows = con.execute(
        "SELECT task_id, map_index, scheduled_dttm, queued_dttm, start_date, end_date, state "
        "FROM task_instance WHERE dag_id = ? AND run_id = ?",
        (DAG_ID, dr["dag_run_id"]),
    ).fetchall()
    con.close()
    batches = [r for r in rows if r[0] == "score_batches"][0]
    mapped = [r for r in rows if r[0] == "score" and r[1] >= 0]
    if len(mapped) != n or any(r[6] != "success" for r in mapped):
        raise RuntimeError(f"map of {n}: {len(mapped)} mapped score tasks, not all succeeded")
    b_end = _ts(batches[5])
    sched = [_ts(r[2]) for r in mapped]
    queued = [_ts(r[3]) for r in mapped]
    start = [_ts(r[4]) for r in mapped]
    end = [_ts(r[5]) for r in mapped]
    span = max(end) - b_end
    return {
        "tasks": n,
        "run_wall_s": round(wall, 1),
        "fanout_s": round(span, 1),
        "fanout_s_per_task": round(span / n, 3),
        "expand_s": round(max(sched) - b_end, 2),
        "median_scheduled_to_queued_s": round(statistics.median(q - s for s, q in zip(sched, queued, strict=True)), 2),
        "median_queued_to_running_s": round(statistics.median(s - q for q, s in zip(queued, start, strict=True)), 2),
        "median_task_s": round(statistics.median(e - s for s, e in zip(start, end, strict=True)), 2),
        "cpu_s_per_task": {k: round((cpu1[k] - cpu0[k]) / n, 3) for k in cpu1},
        "db_bytes_per_task": round((_db_bytes(af.home) - db0) / n),
    }  # fmt: skip


def choose_batch(
    rows: list[dict], score_startup: float, shard_s: float, shards: int, overhead: float
) -> dict:
    """Shards per mapped task so that a task's fixed cost (Airflow's, at the largest map,
    plus the score worker's start-up) is at most ``overhead`` of its wall time, and the
    batch the 1,024-task cap forces at ``shards`` shards."""
    import math

    from pipeline_tasks.orchestration.dag_tasks import MAX_MAP

    airflow = max(r["fanout_s_per_task"] for r in rows)
    fixed = airflow + score_startup
    batch = max(1, math.ceil(fixed * (1 - overhead) / (overhead * shard_s)))
    return {
        "airflow_s_per_task": airflow,
        "score_startup_s": score_startup,
        "shard_score_s": shard_s,
        "overhead": overhead,
        "batch": batch,
        "batch_forced_by_cap": math.ceil(shards / MAX_MAP),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument(
        "--slots", type=int, default=8,
        help="gpu pool slots and the executor's parallelism (a host with 8 devices)",
    )  # fmt: skip
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--work", default=None)
    ap.add_argument(
        "--score-startup", type=float, default=9.3,
        help="a score worker's start-up to its first batch, s (bench_scale.py: 2M entities)",
    )  # fmt: skip
    ap.add_argument(
        "--shard-score-s", type=float, default=1.0,
        help="seconds to score one 10,000-pair shard on one GPU (issue 24's 10,000 images/s)",
    )  # fmt: skip
    ap.add_argument("--overhead", type=float, default=0.10, help="fixed cost share per task")
    ap.add_argument("--shards", type=int, default=110_000, help="shards of a paper-scale build")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("--rechoose", default=None, help="a saved result: only choose the batch")
    a = ap.parse_args()
    if a.rechoose:
        with open(a.rechoose) as f:
            saved = json.load(f)
        saved["batch"] = choose_batch(
            saved["rows"], a.score_startup, a.shard_score_s, a.shards, a.overhead
        )
        print(json.dumps(saved["batch"]))
        with open(a.rechoose, "w") as f:
            json.dump(saved, f, indent=1)
        return 0

    from pipeline_tasks.orchestration.local_airflow import LocalAirflow

    work = os.path.abspath(a.work or tempfile.mkdtemp(prefix="mofi-bench-map-"))
    dags = os.path.join(work, "dags")
    os.makedirs(dags, exist_ok=True)
    with open(os.path.join(dags, "mofi_map_bench.py"), "w") as f:
        f.write(DAG)
    af = LocalAirflow(
        os.path.join(work, "airflow"),
        port=a.port,
        dag_folders={"map-bench": dags},
        extra_env={"AIRFLOW__CORE__PARALLELISM": str(a.slots)},
    )
    af.down()  # a clean metadata DB: stop what an interrupted run left, then start anew
    shutil.rmtree(af.home, ignore_errors=True)
    for n in a.tasks:
        shutil.rmtree(os.path.join(work, f"run_{n}"), ignore_errors=True)
    t_all = time.time()
    af.up()
    try:
        af._airflow("pools", "set", "gpu", str(a.slots), "bench: one slot per device")
        client = af.client()
        client.wait_for_dags([DAG_ID], timeout_s=300)
        client.set_paused(DAG_ID, False)
        pids = {n: rec["pid"] for n, rec in af.running().items()}
        rows = []
        for n in a.tasks:
            r = measure(af, client, work, n, pids)
            rows.append(r)
            print(json.dumps(r), flush=True)
    finally:
        af.down()
    pick = choose_batch(rows, a.score_startup, a.shard_score_s, a.shards, a.overhead)
    print()
    print(f"{'mapped':>7} {'fan-out s/task':>15} {'expand s':>9} {'sched->queued':>14} "
          f"{'queued->run':>12} {'task s':>7} {'CPU s/task sched':>17} {'api':>6} {'tasks':>6} "
          f"{'DB KiB/task':>12}")  # fmt: skip
    for r in rows:
        c = r["cpu_s_per_task"]
        print(
            f"{r['tasks']:>7} {r['fanout_s_per_task']:>15.3f} {r['expand_s']:>9.2f} "
            f"{r['median_scheduled_to_queued_s']:>14.2f} {r['median_queued_to_running_s']:>12.2f} "
            f"{r['median_task_s']:>7.2f} {c['scheduler']:>17.3f} {c['api-server']:>6.3f} "
            f"{c['tasks']:>6.3f} {r['db_bytes_per_task'] / 1024:>12.1f}"
        )
    growth = rows[-1]["fanout_s_per_task"] / rows[0]["fanout_s_per_task"]
    print(f"fan-out time per task, {rows[-1]['tasks']} / {rows[0]['tasks']} mapped: {growth:.2f}")
    print(
        f"batch: {pick['batch']} shards keep Airflow ({pick['airflow_s_per_task']:.2f} s) + a "
        f"score worker's start-up ({pick['score_startup_s']:.1f} s) at {a.overhead:.0%} of a "
        f"task that scores {pick['shard_score_s']:.1f} s per shard; the 1,024 cap makes it "
        f"{pick['batch_forced_by_cap']} at {a.shards:,} shards"
    )
    print(f"total {time.time() - t_all:.0f} s; work folder {work}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": rows, "batch": pick, "slots": a.slots}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
