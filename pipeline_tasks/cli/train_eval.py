"""ML ops' commands: train on an I2E version, evaluate, mix with WiSE-FT, read the results."""

from __future__ import annotations

import argparse
import json

from .common import Overrides, config_kind, with_overrides


def cmd_train(args: argparse.Namespace) -> int:
    from training import recipes
    from training.config import TrainConfig
    from training.launch import launch

    base = TrainConfig.load(args.config_file) if args.config_file else recipes.get(args.config)
    result = launch(with_overrides(base, args), args.i2e, args.out, dry_run=args.dry_run)
    if result["rc"] != 0:
        raise RuntimeError(
            f"torchrun exited with {result['rc']} (re-run the same command to resume)"
        )
    if not args.dry_run:
        print(f"train: model -> {result['model']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluation.run import EvalConfig, run_eval

    c = EvalConfig(
        preprocess=args.preprocess,
        domains=args.domains,
        k=args.k,
        zero_shot=not args.no_zero_shot,
        linear_probe=not args.no_probe,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
    )
    report = run_eval(
        args.model,
        args.images,
        args.out,
        c,
        run_id=args.run_id,
        results_url="" if args.no_results else args.results,
        push_url=args.push,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
        return 0
    m = report["metrics"]
    print(
        f"eval {report['model']} on {report['images']}: {report['n_images']} images, "
        f"{report['n_classes']} classes ({report['singleton_classes']} with one image), "
        f"skipped {report['skipped'] or 'none'}"
    )
    for k in sorted(m):
        v = m[k]
        print(f"  {k:<24}{v:.4f}" if isinstance(v, float) else f"  {k:<24}{v}")
    print(
        f"metrics -> {report['metrics_uri']}"
        + (
            f"; result #{report['result_id']} -> {report['results_url']}"
            if "result_id" in report
            else ""
        )
    )
    return 0


def cmd_wise_ft(args: argparse.Namespace) -> int:
    from evaluation.run import EvalConfig
    from evaluation.wise_ft import default_alphas, wise_ft
    from training.layout import TrainLayout

    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else default_alphas()
    out = args.out or TrainLayout.of_model(args.model).wise_model
    res = wise_ft(
        args.model,
        args.val,
        out,
        alphas,
        args.tolerance,
        [f for f in (args.report or "").split(",") if f],
        EvalConfig(zero_shot=False, linear_probe=False, device=args.device),
    )
    for name, pts in res["curve"].items():
        print(f"{name:<14}" + "  ".join(f"{a:.1f}:{m:.4f}" for a, m in pts))
    print(f"wise-ft: alpha {res['alpha']} (chosen on {args.val}) -> {res['out']}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from evaluation import results

    url = args.db or results.default_url()
    rows = results.read_results(url)
    if args.run_id:
        rows = [r for r in rows if r["run_id"] == args.run_id]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(results.format_table(rows, args.metric))
    if args.png and rows:
        print(f"chart -> {results.write_chart(rows, args.png, args.metric)}")
    return 0


def _train_recipes():
    from training import recipes

    return recipes


def add_commands(sub) -> None:
    config_kind(
        "train",
        "training configs (mofi train --config NAME; show with train:NAME):",
        _train_recipes,
    )

    s = sub.add_parser("train", help="MOFI training through torchrun (DDP; resumable)")
    s.add_argument("--i2e", required=True, help="I2E root URI (from mofi build-i2e)")
    s.add_argument("--out", required=True, help="run folder: checkpoints, logs, model.pt")
    s.add_argument("--config", default="demo", help="named training config (mofi config list)")
    s.add_argument("--config-file", default="", help="a saved TrainConfig JSON")
    ov = Overrides(s, "optim.lr=3e-4")
    ov.flag("--mode", "loss.mode", choices=["multitask", "supervised", "contrastive"])
    ov.flag("--epochs", "epochs", type=int)
    ov.flag("--max-steps", "max_steps", type=int)
    ov.flag("--seed", "seed", type=int)
    ov.flag("--batch-size", "data.batch_size", type=int, help="per process")
    ov.flag("--nproc-per-node", "dist.nproc_per_node", type=int)
    ov.flag("--nnodes", "dist.nnodes", type=int)
    ov.flag("--rdzv-endpoint", "dist.rdzv_endpoint", help="HOST:PORT for multi-node")
    ov.flag("--device", "dist.device", choices=["auto", "cpu", "cuda"])
    s.add_argument(
        "--dry-run", action="store_true", help="check inputs, print the torchrun command"
    )
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="retrieval mAP (GPR1200 protocol), zero-shot, linear probe")
    s.add_argument(
        "--model", required=True, help="checkpoint .pt, open_clip:ARCH[:TAG_OR_PATH] or packaged"
    )
    s.add_argument("--images", required=True, help="folder of {class_id}_{name}.jpg images")
    s.add_argument("--out", default=None, help="metrics JSON URI (default: beside the checkpoint)")
    s.add_argument("--preprocess", choices=["model", "mofi"], default="model")
    s.add_argument("--domains", choices=["auto", "gpr1200", "none"], default="auto")
    s.add_argument("--k", type=int, default=0, help="also report GPR1200's mAP@k")
    s.add_argument("--run-id", default="", help="run id in the results store (default: the model)")
    s.add_argument(
        "--results",
        default=None,
        help="SQLAlchemy URL of the results store (default: $MOFI_RESULTS_URL or runs/results.sqlite)",
    )
    s.add_argument("--no-results", action="store_true", help="do not append to the results store")
    s.add_argument("--push", default=None, help="Pushgateway URL to push the metrics to")
    s.add_argument("--no-zero-shot", action="store_true")
    s.add_argument("--no-probe", action="store_true")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true", help="print the whole report as JSON")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser(
        "wise-ft",
        help="WiSE-FT: mix a fine-tuned model with its pretrained towers, alpha chosen on a validation folder",
    )
    s.add_argument("--model", required=True, help="model.pt from mofi train")
    s.add_argument(
        "--val", required=True, help="validation folder (GPR1200 naming), not trained on"
    )
    s.add_argument(
        "--out",
        default=None,
        help="checkpoint at the chosen alpha (default: beside the model, model.wise.pt)",
    )
    s.add_argument("--alphas", default=None, help="comma list (default 0,0.1,...,1)")
    s.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="smallest alpha within this of the best validation mAP",
    )
    s.add_argument(
        "--report",
        default=None,
        help="more folders measured along the curve (comma list; never used to choose)",
    )
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=cmd_wise_ft)

    s = sub.add_parser("results", help="the results store as a table, and a per-domain mAP chart")
    s.add_argument(
        "--db",
        default=None,
        help="SQLAlchemy URL (default: $MOFI_RESULTS_URL or runs/results.sqlite)",
    )
    s.add_argument("--png", default=None, help="write a chart of mAP by run here")
    s.add_argument("--metric", default="map")
    s.add_argument("--run-id", default="")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_results)
