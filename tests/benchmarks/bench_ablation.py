"""The MOFI paper's loss ablation on our data: supervised only, contrastive only, multi-task,
each trained with `mofi train` (torchrun) from the same initial weights and evaluated with
`mofi eval` on the held-out folder (GPR1200 protocol), next to the initial weights and the
packaged backbone.

    .venv/bin/python tests/benchmarks/bench_ablation.py --i2e runs/demo/i2e250 \
        --images runs/demo/eval --out runs/ablation

Every result is also appended to the results store (``--results``), so `mofi results --png`
charts it. Training runs resume: re-running after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--i2e", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--modes", default="supervised,contrastive,multitask")
    ap.add_argument("--results", default="", help="SQLAlchemy URL (default: OUT/results.sqlite)")
    args = ap.parse_args()

    from evaluation.run import EvalConfig, run_eval
    from training import recipes
    from training.model import DualEncoder, checkpoint_state, save_checkpoint

    os.makedirs(args.out, exist_ok=True)
    db = args.results or "sqlite:///" + os.path.abspath(os.path.join(args.out, "results.sqlite"))
    c = recipes.get(args.config)
    ec = EvalConfig(workers=1)
    rows = []

    def evaluate(label: str, spec: str) -> None:
        rep = run_eval(
            spec,
            args.images,
            os.path.join(args.out, f"{label}.metrics.json"),
            ec,
            run_id=f"ablation/{label}",
            results_url=db,
            progress=False,
        )
        m = rep["metrics"]
        rows.append((label, m["map"], m.get("zero_shot/top1"), m.get("linear_probe/top1")))
        print(f"  {label}: mAP {m['map']:.4f}", flush=True)

    evaluate("packaged backbone", "packaged")
    # the trainer's initial weights: same seed, same construction
    torch.manual_seed(c.seed)
    init = DualEncoder(c.model, pretrained_towers=True)
    init_uri = os.path.join(args.out, "initial.pt")
    save_checkpoint(init_uri, "dual_encoder", c.model, checkpoint_state(init, True))
    evaluate("initial weights", init_uri)
    for mode in args.modes.split(","):
        out = os.path.join(args.out, mode)
        cmd = [
            sys.executable, "-m", "pipeline_tasks.cli", "-q", "train", "--i2e", args.i2e,
            "--out", out, "--config", args.config, "--mode", mode, "--epochs", str(args.epochs),
        ]  # fmt: skip
        print(f"training {mode}: {' '.join(cmd[2:])}", flush=True)
        rc = subprocess.call(cmd, cwd=ROOT)
        if rc != 0:
            print(f"{mode}: training failed with {rc}", file=sys.stderr)
            return rc
        evaluate(mode, os.path.join(out, "model.pt"))

    print()
    print(f"held-out retrieval on {args.images} ({args.config}, {args.epochs} epoch(s)):")
    print("| model | mAP | zero-shot top-1 | linear probe top-1 |")
    print("|---|---|---|---|")
    for label, m, zs, lp in rows:
        f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"| {label} | {m:.4f} | {f(zs)} | {f(lp)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
