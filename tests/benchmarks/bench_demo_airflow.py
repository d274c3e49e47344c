"""The demo through Airflow against the same stages run by the CLI, on the same inputs.

    .venv/bin/python tests/benchmarks/bench_demo_airflow.py [--pairs 5000] [--work DIR]

Both paths read one set of inputs (KB, corpus, eval folders) made first:

* CLI: `mofi build-i2e` + `mofi train` + `mofi eval` of the model and of the packaged baseline
  on every eval folder, one after the other;
* Airflow: `mofi demo` (local Airflow started, the build triggered over REST, training
  triggered by the asset, the same evaluations as mapped tasks, the services stopped).

Prints each path's wall time, the ratio, the part of the Airflow path from the trigger to the
end of the training run, and the peak memory (PSS) of each whole process tree (the Airflow
services and every task included). Target: Airflow / CLI <= 1.3, the demo under 15 minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _rss import run_and_sample  # noqa: E402

from pipeline_tasks.orchestration.dag_tasks import WISE_ALPHAS  # noqa: E402 (the DAG's default)

GIB = 1 << 30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None)
    a = p.parse_args()
    work = os.path.abspath(a.work or tempfile.mkdtemp(prefix="mofi-bench-airflow-"))
    py = sys.executable
    from pipeline_tasks.demo.airflow_demo import prepare_inputs

    inputs = os.path.join(work, "inputs")
    folders = prepare_inputs(inputs, a.pairs, a.seed)
    # the Airflow path's run folder gets the same inputs (the demo skips what is there)
    af_run = os.path.join(work, "airflow_path")
    cli = os.path.join(work, "cli_path")
    for path in (af_run, cli):  # both paths time a whole run: nothing kept from an earlier one
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(af_run)
    for name in ("kb", "raw", "truth", "eval", "val", "photos_eval"):
        src = os.path.join(inputs, name)
        if os.path.exists(src) and not os.path.exists(os.path.join(af_run, name)):
            shutil.copytree(src, os.path.join(af_run, name))

    mofi = f"{shlex.quote(py)} -m pipeline_tasks.cli -q"
    db = f"sqlite:///{cli}/results.sqlite"
    steps = [
        f"{mofi} build-i2e --raw {inputs}/raw --kb {inputs}/kb --run {cli}/i2e_run --out {cli}/i2e --config demo --no-progress",
        f"{mofi} train --i2e {cli}/i2e --out {cli}/train --config demo",
    ]
    val = os.path.join(inputs, "val")
    if os.path.isdir(val):  # as the train DAG does with a validation folder
        steps.append(
            f"{mofi} wise-ft --model {cli}/train/model.pt --val {val} --alphas {WISE_ALPHAS}"
        )
    for f in folders:
        name = os.path.basename(f)
        if os.path.isdir(val):
            steps.append(
                f"{mofi} eval --model {cli}/train/model.wise.pt --images {f} --run-id cli/wise --results {db} --no-progress --out {cli}/eval/{name}.wise.json"
            )
        steps += [
            f"{mofi} eval --model {cli}/train/model.pt --images {f} --run-id cli --results {db} --no-progress --out {cli}/eval/{name}.json",
            f"{mofi} eval --model packaged --images {f} --run-id cli/packaged --results {db} --no-progress --out {cli}/eval/{name}.packaged.json",
        ]
    script = " && ".join(steps)
    print("== CLI path: build-i2e, train, evaluations", flush=True)
    c = run_and_sample(["bash", "-c", script], pss_interval=2.0)
    if c["rc"] != 0:
        print(f"CLI path failed (rc {c['rc']})")
        return 1
    print(
        f"   {c['wall_s']:.0f} s, peak PSS of the tree {c['peak_total_rss'] / GIB:.2f} GiB",
        flush=True,
    )

    print("== Airflow path: mofi demo", flush=True)
    log = os.path.join(work, "airflow_path.log")
    with open(log, "w") as out:
        d = run_and_sample(
            [py, "-m", "pipeline_tasks.cli", "demo", "--run", af_run, "--pairs", str(a.pairs),
             "--seed", str(a.seed)],
            pss_interval=2.0,
            stdout=out,
            stderr=out,
        )  # fmt: skip
    text = open(log).read()
    if d["rc"] != 0:
        print(f"Airflow path failed (rc {d['rc']}); log: {log}")
        return 1
    m = re.search(r"\(([\d.]+) min through Airflow\)", text)
    through = float(m.group(1)) * 60 if m else float("nan")
    print(
        f"   {d['wall_s']:.0f} s, peak PSS of the tree {d['peak_total_rss'] / GIB:.2f} GiB",
        flush=True,
    )
    print()
    print(
        f"CLI path (build-i2e + train + evals)        {c['wall_s']:8.0f} s   peak PSS {c['peak_total_rss'] / GIB:5.2f} GiB"
    )
    print(
        f"Airflow path (mofi demo, services included) {d['wall_s']:8.0f} s   peak PSS {d['peak_total_rss'] / GIB:5.2f} GiB"
    )
    print(f"   of which trigger -> training run done    {through:8.0f} s")
    print(
        f"ratio Airflow / CLI: {d['wall_s'] / c['wall_s']:.2f} (whole demo), {through / c['wall_s']:.2f} (trigger to done); target <= 1.3"
    )
    print(f"demo under 15 minutes: {d['wall_s'] / 60:.1f} min")
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
