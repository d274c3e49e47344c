"""The MOFI paper's loss ablation on our data, on every eval folder, over several seeds:
supervised only, contrastive only, multi-task, each trained with `mofi train` (torchrun) and
evaluated with `mofi eval` (GPR1200 protocol), next to the packaged backbone; with ``--val``,
each model's WiSE-FT mix too (its mixing weight chosen on the validation folder).

    .venv/bin/python tests/benchmarks/bench_ablation.py --i2e runs/demo/v=DATE/i2e \
        --images runs/demo/eval,runs/demo/photos_eval --val runs/demo/val \
        --seeds 0,1 --out runs/ablation

Prints per folder the mean mAP over the seeds with its spread (min-max). Every result is also
appended to the results store (``--results``). Training runs resume.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from pipeline_tasks.orchestration.dag_tasks import WISE_ALPHAS  # noqa: E402 (the DAG's default)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--i2e", required=True)
    ap.add_argument("--images", required=True, help="eval folders, comma separated")
    ap.add_argument("--val", default="", help="validation folder: also evaluate WiSE-FT mixes")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--alphas", default=WISE_ALPHAS, help="WiSE-FT mixing weights")
    ap.add_argument("--modes", default="supervised,contrastive,multitask")
    ap.add_argument("--results", default="", help="SQLAlchemy URL (default: OUT/results.sqlite)")
    args = ap.parse_args()

    from evaluation.run import EvalConfig, run_eval
    from evaluation.wise_ft import wise_ft

    os.makedirs(args.out, exist_ok=True)
    alphas = [float(a) for a in args.alphas.split(",")]
    db = args.results or "sqlite:///" + os.path.abspath(os.path.join(args.out, "results.sqlite"))
    folders = [f for f in args.images.split(",") if f]
    names = [os.path.basename(f.rstrip("/")) for f in folders]
    ec = EvalConfig(workers=1, zero_shot=False, linear_probe=False)
    table: dict[str, dict[str, list[float]]] = {}

    def evaluate(label: str, spec: str, seed: str) -> None:
        for folder, name in zip(folders, names, strict=True):
            rep = run_eval(
                spec,
                folder,
                os.path.join(args.out, f"{label}.{seed}.{name}.metrics.json"),
                ec,
                run_id=f"ablation/{label}/seed{seed}",
                results_url=db,
                progress=False,
            )
            table.setdefault(label, {}).setdefault(name, []).append(rep["metrics"]["map"])
            print(f"  {label} seed {seed} on {name}: mAP {rep['metrics']['map']:.4f}", flush=True)

    evaluate("packaged backbone", "packaged", "-")
    for seed in args.seeds.split(","):
        for mode in args.modes.split(","):
            out = os.path.join(args.out, f"{mode}.seed{seed}")
            cmd = [
                sys.executable, "-m", "pipeline_tasks.cli", "-q", "train", "--i2e", args.i2e,
                "--out", out, "--config", args.config, "--mode", mode,
                "--epochs", str(args.epochs), "--seed", seed,
            ]  # fmt: skip
            print(f"training {mode} seed {seed}: {' '.join(cmd[2:])}", flush=True)
            rc = subprocess.call(cmd, cwd=ROOT)
            if rc != 0:
                print(f"{mode}: training failed with {rc}", file=sys.stderr)
                return rc
            model = os.path.join(out, "model.pt")
            evaluate(mode, model, seed)
            if args.val:
                res = wise_ft(model, args.val, os.path.join(out, "model.wise.pt"), alphas)
                print(f"  {mode} seed {seed}: WiSE-FT alpha {res['alpha']}", flush=True)
                evaluate(f"{mode} + WiSE-FT", res["out"], seed)

    print()
    print(
        f"retrieval mAP ({args.config}, {args.epochs} epoch(s), seeds {args.seeds}; mean, min-max)"
    )
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, per in table.items():
        cells = []
        for name in names:
            v = per.get(name, [])
            if len(v) > 1:
                cells.append(f"{statistics.mean(v):.4f} ({min(v):.4f}-{max(v):.4f})")
            else:
                cells.append(f"{v[0]:.4f}" if v else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
