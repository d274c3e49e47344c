"""An incremental rebuild against a full build, through the CLI and through the build DAG.

    .venv/bin/python tests/benchmarks/bench_incremental.py [--pairs 10000] [--shards 10]
        [--work DIR] [--no-airflow]

Inputs: the demo corpus in ``--shards`` raw shards (version 1), and version 2: the same
shards, one shard in ten added, and one re-crawled (same name, 5 % of its samples gone).
KB, config and scorer are unchanged.

* CLI: `mofi build-i2e` of version 1 from nothing (the scorer bootstrapped: what every build
  cost before), then version 2 with ``--reuse-from`` version 1, then version 2 from scratch
  with version 1's scorer (the same scorer, nothing reused) for the byte comparison;
* Airflow: a local Airflow (LocalExecutor, SQLite), the build DAG triggered over REST for
  version 1 (``reuse_from: none``) and then for version 2 with the defaults (it finds
  version 1 on the ``mofi_i2e`` asset); trigger to finish.

Prints, per path, the shards ner and score computed and reused (from their done markers),
whether version 2's I2E equals the from-scratch one byte for byte (every data file; the
markers and ``_info.json``, which names its run folder, excepted), and the rebuild's wall
time against the full build's. Version 2 has one shard more than version 1, so the ratio
against version 1's full build is a little pessimistic. Target: <= 0.35.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _testdata():
    """tests/mofi_testdata.py, loaded by path (putting tests/ on sys.path would shadow the
    project's packages with the test folders of the same names)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mofi_testdata", os.path.join(os.path.dirname(HERE), "mofi_testdata.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TARGET = 0.35


def _data_files(i2e: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(i2e):
        dirs[:] = [x for x in dirs if x != "_markers"]
        out += [os.path.relpath(os.path.join(d, f), i2e) for f in files if f != "_info.json"]
    return sorted(out)


def identical(a: str, b: str) -> bool:
    files = _data_files(a)
    if files != _data_files(b) or not files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    return not mismatch and not errors


def split(run: str) -> dict[str, dict[str, int]]:
    """Per stage: shards computed here and reused, from the done markers."""
    from pipeline_tasks.runtime.layout import NER, SCORE, RunLayout

    out = {}
    for stage in (NER, SCORE):
        done = [r for r in RunLayout(run).store(stage).read_all().values() if r["state"] == "done"]
        reused = sum(1 for r in done if r.get("reused_from"))
        out[stage] = {"computed": len(done) - reused, "reused": reused}
    return out


def make_inputs(work: str, pairs: int, shards: int, seed: int) -> tuple[str, str, str]:
    """(kb, raw version 1, raw version 2)."""
    mofi = [sys.executable, "-m", "pipeline_tasks.cli", "-q"]
    kb = os.path.join(work, "kb")
    per = pairs // shards
    subprocess.run([*mofi, "kb", "--out", kb, "--config", "demo"], check=True)
    raws = []
    for name, n in (("raw1", per * shards), ("raw2", per * (shards + 1))):
        raw = os.path.join(work, name)
        subprocess.run(
            [*mofi, "corpus", "--out", raw, "--kb", kb, "--config", "demo", "--no-progress"]
            + ["--pairs", str(n), "--shard-size", str(per), "--seed", str(seed)]
            + ["--eval-out", os.path.join(work, f"eval-{name}")]
            + ["--truth-out", os.path.join(work, f"truth-{name}")],
            check=True,
        )
        raws.append(raw)
    for sid in range(shards):  # version 2 extends version 1: the same bytes, one shard more
        a, b = (os.path.join(r, f"{sid:05d}.tar") for r in raws)
        assert filecmp.cmp(a, b, shallow=False), f"corpus shard {sid} differs between versions"
    _testdata().copy_raw_shard(
        raws[1], f"{shards // 2:05d}", drop_last=max(1, per // 20)
    )  # re-crawled
    return kb, raws[0], raws[1]


def timed(cmd: list[str], log: str) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")
    return time.time() - t0


def cli_path(work: str, kb: str, raw1: str, raw2: str) -> dict:
    mofi = [sys.executable, "-m", "pipeline_tasks.cli", "-q", "build-i2e", "--config", "demo"]
    root = os.path.join(work, "cli")
    v1, v2, scratch = (os.path.join(root, v) for v in ("v=1", "v=2", "scratch"))
    out = {}
    out["full_s"] = timed(
        [*mofi, "--raw", raw1, "--kb", kb, "--out", f"{v1}/i2e", "--no-progress"],
        f"{root}-v1.log",
    )
    out["rebuild_s"] = timed(
        [*mofi, "--raw", raw2, "--kb", kb, "--out", f"{v2}/i2e", "--no-progress"]
        + ["--reuse-from", v1],
        f"{root}-v2.log",
    )
    scorer = os.path.join(v1, "i2e_run", "scorer", "packaged.pt")
    out["scratch_same_scorer_s"] = timed(
        [*mofi, "--raw", raw2, "--kb", kb, "--out", f"{scratch}/i2e", "--no-progress"]
        + ["--set", f"score.model={scorer}"],
        f"{root}-scratch.log",
    )
    out["shards"] = split(f"{v2}/i2e_run")
    out["identical"] = identical(f"{v2}/i2e", f"{scratch}/i2e")
    out["scratch"] = f"{scratch}/i2e"
    return out


def airflow_path(work: str, kb: str, raw1: str, raw2: str, scratch: str) -> dict:
    from pipeline_tasks.orchestration.local_airflow import LocalAirflow

    root = os.path.join(work, "airflow")
    af = LocalAirflow(os.path.join(work, "airflow_home"), extra_env={"MOFI_ROOT": root})
    af.up()
    out = {}
    try:
        client = af.client()
        dag = "mofi_build_i2e"
        client.wait_for_dags([dag])
        client.set_paused(dag, False)  # the train DAG stays paused: nothing else runs
        for name, conf in (
            ("full_s", {"raw": raw1, "version": "1", "reuse_from": "none"}),
            ("rebuild_s", {"raw": raw2, "version": "2"}),  # the defaults: reuse the latest
        ):
            t0 = time.time()
            run = client.trigger(dag, {**conf, "kb": kb, "config": "demo"})
            done = client.wait(dag, run["dag_run_id"], timeout_s=3600, poll_s=2.0)
            if done["state"] != "success":
                sys.exit(f"{dag} {conf['version']}: {done['state']} (Airflow home {af.home})")
            out[name] = time.time() - t0
    finally:
        af.down()
    out["shards"] = split(os.path.join(root, "v=2", "i2e_run"))
    out["identical"] = identical(os.path.join(root, "v=2", "i2e"), scratch)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=10000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None)
    p.add_argument("--no-airflow", action="store_true")
    a = p.parse_args()
    work = os.path.abspath(a.work or tempfile.mkdtemp(prefix="mofi-bench-incremental-"))
    os.makedirs(work, exist_ok=True)
    kb, raw1, raw2 = make_inputs(work, a.pairs, a.shards, a.seed)
    results = {"pairs": a.pairs, "shards": [a.shards, a.shards + 1], "work": work}
    results["cli"] = cli_path(work, kb, raw1, raw2)
    if not a.no_airflow:
        results["airflow"] = airflow_path(work, kb, raw1, raw2, results["cli"]["scratch"])
    print(f"\n{a.pairs} pairs in {a.shards} raw shards; version 2: one shard added, one re-crawled")
    ok = True
    for path in ("cli", "airflow"):
        r = results.get(path)
        if not r:
            continue
        r["ratio"] = r["rebuild_s"] / r["full_s"]
        met = r["ratio"] <= TARGET and r["identical"]
        ok &= met
        print(
            f"{path:8} full {r['full_s']:6.0f} s  rebuild {r['rebuild_s']:6.0f} s  "
            f"rebuild/full {r['ratio']:.2f} (target <= {TARGET})  I2E identical to a "
            f"from-scratch build: {r['identical']}  {'met' if met else 'NOT MET'}"
        )
        for stage, n in r["shards"].items():
            print(f"{'':9}{stage}: {n['computed']} shards computed, {n['reused']} reused")
    c = results["cli"]
    print(
        f"cli      from scratch with the same scorer {c['scratch_same_scorer_s']:.0f} s "
        f"(rebuild / that: {c['rebuild_s'] / c['scratch_same_scorer_s']:.2f})"
    )
    print(json.dumps(results, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
