"""The ``mofi`` command. Each subcommand is a thin parser over one library call.

Heavy imports (torch, Spark, spaCy) happen inside the subcommand that needs them, so
``mofi status`` answers in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from training.core.config import ConfigError


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------ subcommands


def _train_config(args: argparse.Namespace):
    from training import recipes
    from training.config import TrainConfig

    config = TrainConfig.load(args.config_file) if args.config_file else recipes.get(args.config)
    changes = {
        k: v
        for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps), ("seed", args.seed))
        if v is not None
    }
    if changes:
        config = config.replace(**changes)
    if args.mode:
        config = config.replace(loss=config.loss.replace(mode=args.mode))
    dist_changes = {
        k: v
        for k, v in (
            ("nproc_per_node", args.nproc_per_node),
            ("nnodes", args.nnodes),
            ("rdzv_endpoint", args.rdzv_endpoint),
            ("device", args.device),
        )
        if v is not None
    }
    if dist_changes:
        config = config.replace(dist=config.dist.replace(**dist_changes))
    if args.batch_size:
        config = config.replace(data=config.data.replace(batch_size=args.batch_size))
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from training.launch import launch

    result = launch(_train_config(args), args.i2e, args.out, dry_run=args.dry_run)
    if result["rc"] != 0:
        raise RuntimeError(
            f"torchrun exited with {result['rc']} (re-run the same command to resume)"
        )
    if not args.dry_run:
        print(f"train: model -> {result['model']}")
    return 0


def cmd_kb(args: argparse.Namespace) -> int:
    from pipeline_tasks import kb, recipes

    config = recipes.get(args.config).kb
    if args.source:
        config = config.replace(sources=tuple(args.source))
    if args.min_city_population is not None:
        config = config.replace(min_city_population=args.min_city_population)
    t0 = time.time()
    stats = kb.build_kb(config, args.out)
    drops = ", ".join(f"{k}={v}" for k, v in stats.drops.items()) or "none"
    print(
        f"kb: {stats.n_out} entities from {stats.n_in} rows -> {args.out} ({time.time() - t0:.1f}s); skipped: {drops}"
    )
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from pipeline_tasks.demo import corpus
    from pipeline_tasks.demo import recipes as demo_recipes

    config = demo_recipes.get(args.config)
    changes = {
        k: v
        for k, v in (
            ("pairs", args.pairs),
            ("seed", args.seed),
            ("shard_size", args.shard_size),
            ("workers", args.workers),
        )
        if v is not None
    }
    if args.stamps:
        changes["stamps_dir"] = args.stamps
    config = config.replace(**changes)
    t0 = time.time()
    result = corpus.build_corpus(
        config,
        out_uri=args.out,
        kb_uri=args.kb,
        eval_out=args.eval_out,
        truth_out=args.truth_out,
        progress=not args.no_progress,
    )
    if result.failed:
        _print_result("corpus", result)
        return 1
    print(
        f"corpus: {result['samples']} pairs in {result['shards']} shards -> {args.out} "
        f"({time.time() - t0:.1f}s); eval images: {result['eval_images']} in {result['eval_classes']} classes -> {result['eval_dir']}; "
        f"truth -> {result['truth_dir']}"
    )
    return 0


def cmd_fetch_stamps(args: argparse.Namespace) -> int:
    from pipeline_tasks.demo import stamps

    path = stamps.ensure_stamps(args.dir)
    n = len(stamps.list_stamps(path))
    print(f"stamps: {n} picture + caption pairs in {path}")
    return 0


def cmd_photos(args: argparse.Namespace) -> int:
    from pipeline_tasks.demo import photos

    r = photos.write_eval_folder(args.out, photos_dir=args.cache, classes=args.classes)
    skipped = ", ".join(f"{k} {v}" for k, v in r["skipped"].items()) or "none"
    print(
        f"photos: {r['images']} images, {r['classes']} classes (by {r['classes_by']}) in "
        f"{r['out_dir']}; skipped: {skipped}; dropped {r['dropped_classes']} classes with "
        f"fewer than 2 photos ({r['dropped_images']} images); cache {r['source']}"
    )
    return 0


def _bundle(args: argparse.Namespace):
    from pipeline_tasks import recipes

    return recipes.get(args.config)


def _print_result(name: str, res) -> None:
    d = res.to_dict() if hasattr(res, "to_dict") else res
    print(f"{name}: " + json.dumps(d, sort_keys=True, default=str))


def _shards(arg: str | None) -> list[str] | None:
    """``--shards 00000,00003`` -> ids; None means every planned shard."""
    if not arg:
        return None
    return [s.strip() for s in arg.split(",") if s.strip()]


def cmd_ner(args: argparse.Namespace) -> int:
    from pipeline_tasks import ner

    c = _bundle(args).ner
    c = c.replace(spark=_spark_overrides(c.spark, args))
    res = ner.run_ner(c, args.raw, args.kb, args.run, progress=not args.no_progress)
    _print_result("ner", res)
    return 1 if res.failed else 0


def _spark_overrides(spark, args: argparse.Namespace):
    """--master / --deploy-mode (an Airflow task passes its spark_default connection's)."""
    changes = {k: v for k, v in (("master", args.master), ("deploy_mode", args.deploy_mode)) if v}
    return spark.replace(**changes) if changes else spark


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from pipeline_tasks import bootstrap
    from pipeline_tasks.runtime.layout import RunLayout

    c = _bundle(args).bootstrap
    if args.objective:
        c = c.replace(objective=args.objective)
    out = args.out or RunLayout(args.run).scorer_checkpoint
    res = bootstrap.bootstrap_scorer(
        c, args.raw, out, args.run, args.kb, progress=not args.no_progress
    )
    _print_result("scorer-bootstrap", res)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline_tasks import scoring

    p = _bundle(args)
    c = p.score
    changes = {
        k: v
        for k, v in (
            ("backend", args.backend),
            ("model", args.model),
            ("devices", args.devices),
            ("batch_size", args.batch_size),
            ("loader_workers", args.loader_workers),
            ("decode", args.decode),
        )
        if v is not None
    }
    c = c.replace(**changes)
    if args.bootstrap_if_missing:
        boot = scoring.ensure_scorer(
            c, p.bootstrap, args.raw, args.kb, args.run, progress=not args.no_progress
        )
        if boot is not None:
            _print_result("scorer-bootstrap", boot)
    res = scoring.run_score(
        c,
        args.raw,
        args.run,
        args.kb,
        progress=not args.no_progress,
        reference_every=args.reference_every,
        only=_shards(args.shards),
        prepare=args.prepare,
    )
    _print_result("score", res)
    return 1 if res.failed else 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from pipeline_tasks import vocab

    c = _bundle(args).vocab
    changes = {
        k: v
        for k, v in (
            ("threshold", args.threshold),
            ("threshold_mode", args.threshold_mode),
            ("null_quantile", args.null_quantile),
            ("top_k", args.top_k),
            ("min_count", args.min_count),
        )
        if v is not None
    }
    if args.threshold is not None and args.threshold_mode is None:
        changes["threshold_mode"] = "absolute"  # an explicit threshold is an absolute one
    c = c.replace(spark=_spark_overrides(c.spark, args), **changes)
    res = vocab.run_vocab(c, args.run, args.kb, progress=not args.no_progress)
    _print_result("vocab", res)
    return 1 if res.failed else 0


def cmd_write(args: argparse.Namespace) -> int:
    from pipeline_tasks import write

    c = _bundle(args).write
    if args.shard_size is not None:
        c = c.replace(shard_size=args.shard_size)
    res = write.run_write(
        c, args.raw, args.run, args.out, progress=not args.no_progress, only=_shards(args.shards)
    )
    _print_result("write", res)
    return 1 if res.failed else 0


def cmd_build_i2e(args: argparse.Namespace) -> int:
    from pipeline_tasks import build
    from pipeline_tasks.runtime.layout import RunLayout

    p = _bundle(args)
    run = args.run or RunLayout.beside(args.out).root
    t0 = time.time()
    res = build.build_i2e(p, args.raw, args.kb, run, args.out, progress=not args.no_progress)
    w = res["write"]
    print(
        f"build-i2e: {w['num_samples']} images, {w['num_classes']} classes in {w['num_shards']} shards -> {args.out} ({time.time() - t0:.0f}s); work files in {run}"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline_tasks.runtime import status

    while True:
        summaries = status.summarize_run(args.run)
        if args.json:
            print(status.to_json(args.run, summaries))
        else:
            print(status.render(summaries, args.run))
        if not args.watch:
            break
        time.sleep(args.watch)
        print()
    return 1 if any(s["failed"] or s["invalid"] for s in summaries) else 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from pipeline_tasks.dashboard.app import serve
    from pipeline_tasks.dashboard.config import DashboardConfig

    config = DashboardConfig(
        roots=tuple(args.roots), results_url=args.results or "", refresh_s=args.refresh
    )
    print(f"dashboard: http://{args.host}:{args.port}/ (metrics at /metrics); Ctrl-C stops it")
    serve(config, host=args.host, port=args.port)
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


def cmd_airflow(args: argparse.Namespace) -> int:
    from pipeline_tasks.demo.airflow_demo import validation_folder
    from pipeline_tasks.orchestration.local_airflow import LocalAirflow, run_env

    home = args.home or os.path.join(args.run, "airflow")
    af = LocalAirflow(
        home,
        args.port,
        extra_env=run_env(args.run, _existing_eval_folders(args.run), validation_folder(args.run)),
    )
    if args.action == "up":
        info = af.up()
        verb = "already running" if info["reused"] else "started"
        print(
            f"airflow: {verb} at {af.url} (home {af.home}); login: user admin, password in "
            f"{af.passwords_file}; shell settings: source {af.write_env_file()}"
        )
    elif args.action == "down":
        stopped = af.down()
        print(f"airflow: stopped {', '.join(stopped) or 'nothing (not running)'}")
    else:
        print(json.dumps(af.status(), indent=2))
    return 0


def _existing_eval_folders(run: str) -> list[str]:
    folders = [os.path.join(run, f) for f in ("eval", "photos_eval")]
    return [f for f in folders if os.path.isdir(f)] or [os.path.join(run, "eval")]


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline_tasks.demo import airflow_demo

    return airflow_demo.run_demo(args.run, args.pairs, args.seed, args.keep, args.port)


def cmd_wise_ft(args: argparse.Namespace) -> int:
    from evaluation.run import EvalConfig
    from evaluation.wise_ft import default_alphas, wise_ft

    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else default_alphas()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.model)), "model.wise.pt")
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


def cmd_config(args: argparse.Namespace) -> int:
    from pipeline_tasks import recipes
    from training import recipes as train_recipes

    if args.action == "list":
        print("pipeline configs (mofi kb/ner/score/.../build-i2e --config NAME):")
        for name, fn in recipes.RECIPES.items():
            print(f"  {name:<12}{(fn.__doc__ or '').strip().splitlines()[0]}")
        print("training configs (mofi train --config NAME; show with train:NAME):")
        for name, fn in train_recipes.RECIPES.items():
            print(f"  {name:<12}{(fn.__doc__ or '').strip().splitlines()[0]}")
        from pipeline_tasks.demo import recipes as demo_recipes

        print("demo corpus configs (mofi corpus --config NAME; show with corpus:NAME):")
        for name, fn in demo_recipes.RECIPES.items():
            print(f"  {name:<12}{(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    kind, _, name = args.name.rpartition(":")
    if kind == "train":
        one = train_recipes.get(name)
    elif kind == "corpus":
        from pipeline_tasks.demo import recipes as demo_recipes

        one = demo_recipes.get(name)
    elif kind:
        raise ConfigError(f"unknown config kind {kind!r}: use NAME, train:NAME or corpus:NAME")
    else:
        one = None
    if one is not None:
        if args.action == "show":
            print(one.to_json())
            return 0
        stages = [(kind, one)] + [
            (f.name, getattr(one, f.name))
            for f in dataclasses.fields(one)
            if hasattr(getattr(one, f.name), "describe")
        ]
    else:
        bundle = recipes.get(name)
        if args.action == "show":
            print(bundle.to_json())
            return 0
        stages = [(st.stage_name(), st) for st in bundle.stages()]
    for label, stage in stages:
        print(f"[{label}]  {(type(stage).__doc__ or '').strip().splitlines()[0]}")
        for fname, _default, doc in type(stage).describe():
            value = getattr(stage, fname)
            shown = "(see below)" if hasattr(value, "describe") else repr(value)
            print(f"  {fname:<24}{shown:<28}{doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mofi",
        description="MOFI pipeline: noisy image-text pairs -> I2E dataset -> MOFI encoders",
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=1, help="more logging (-vv for debug)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("kb", help="build the knowledge base (entities.parquet)")
    s.add_argument("--out", required=True, help="KB root URI (local path or s3://)")
    s.add_argument("--config", default="demo", help="named config (mofi config list)")
    s.add_argument(
        "--source",
        action="append",
        help="a builtin source (vital, countries, cities) or a KB table path/URI; repeatable; replaces the config's sources",
    )
    s.add_argument("--min-city-population", type=int, default=None)
    s.set_defaults(fn=cmd_kb)

    s = sub.add_parser(
        "corpus", help="write the demo corpus (img2dataset layout) from real pictures"
    )
    s.add_argument("--out", required=True, help="raw corpus root URI")
    s.add_argument(
        "--kb", required=True, help="KB root URI (ground-truth entities are linked to it)"
    )
    s.add_argument("--pairs", type=int, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--shard-size", type=int, default=None)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument(
        "--stamps",
        default=None,
        help="folder of picture + caption pairs (default: fetched tuxpaint stamps)",
    )
    s.add_argument(
        "--eval-out", default=None, help="held-out evaluation folder (default: OUT/../eval)"
    )
    s.add_argument("--truth-out", default=None, help="ground truth folder (default: OUT/../truth)")
    s.add_argument("--config", default="demo")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_corpus)

    s = sub.add_parser("fetch-stamps", help="fetch and cache the tuxpaint stamp pictures")
    s.add_argument(
        "--dir",
        default=None,
        help="cache folder (default: $MOFI_STAMPS_DIR, else <repo>/data/stamps)",
    )
    s.set_defaults(fn=cmd_fetch_stamps)

    s = sub.add_parser(
        "photos",
        help="write an out-of-domain evaluation folder of real photographs (GPR1200 naming)",
    )
    s.add_argument("--out", required=True, help="evaluation folder to write (replaced whole)")
    s.add_argument(
        "--cache",
        default=None,
        help="photo cache folder (default: $MOFI_DATA_DIR/photos, else data/photos in the repo)",
    )
    s.add_argument(
        "--classes",
        choices=["food", "group"],
        default="food",
        help="a class per food (default; Mango, Brinjal, ...) or per food group (20 classes)",
    )
    s.set_defaults(fn=cmd_photos)

    def stage_parser(name: str, help: str, raw: bool = True, kb: bool = True):
        sp = sub.add_parser(name, help=help)
        if raw:
            sp.add_argument("--raw", required=True, help="raw corpus root (img2dataset layout)")
        if kb:
            sp.add_argument("--kb", required=True, help="KB root URI")
        sp.add_argument("--config", default="demo", help="named config (mofi config list)")
        sp.add_argument("--no-progress", action="store_true")
        return sp

    s = stage_parser("ner", "Spark job: NER + KB linking over raw captions")
    s.add_argument("--out", "--run", dest="run", required=True, help="run root URI; writes RUN/ner")
    s.add_argument("--master", default=None, help="Spark master (overrides the config)")
    s.add_argument("--deploy-mode", default=None, choices=["client", "cluster"])
    s.set_defaults(fn=cmd_ner)

    s = stage_parser(
        "scorer-bootstrap", "train the packaged CLIP-style scorer's heads on the raw corpus"
    )
    s.add_argument(
        "--run", required=True, help="run root URI (reads RUN/ner for the entity objective)"
    )
    s.add_argument("--out", default=None, help="checkpoint URI (default RUN/scorer/packaged.pt)")
    s.add_argument("--objective", choices=["entity", "caption"], default=None)
    s.set_defaults(fn=cmd_bootstrap)

    s = stage_parser("score", "image/entity similarity workers (one per device)")
    s.add_argument("--run", required=True, help="run root URI; reads RUN/ner, writes RUN/score")
    s.add_argument("--backend", choices=["packaged", "open_clip", "mofi"], default=None)
    s.add_argument(
        "--model", default=None, help="checkpoint URI, or for open_clip ARCH[:TAG_OR_PATH]"
    )
    s.add_argument("--devices", default=None, help="auto, cpu, or cuda:0,cuda:1")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument(
        "--decode",
        choices=["auto", "device", "processes", "threads"],
        default=None,
        help="decode on the device (GPUs: nvJPEG), in loader processes overlapped with the model, or in threads between forward passes (CPU); auto picks by device",
    )
    s.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="decode processes or threads per scoring worker (0: auto)",
    )
    s.add_argument(
        "--bootstrap-if-missing",
        action="store_true",
        help="packaged backend: train the scorer (mofi scorer-bootstrap) first when RUN has none",
    )
    s.add_argument(
        "--shards", default=None, help="only these planned shards (comma list; Airflow mapping)"
    )
    s.add_argument(
        "--prepare",
        action="store_true",
        help="plan and embed the entity texts only (before mapped image tasks)",
    )
    s.add_argument(
        "--reference-every",
        type=int,
        default=0,
        metavar="N",
        help="after every N batches also time a forward pass on a preloaded batch, and report end to end / bare forward (costs 1/N more model time)",
    )
    s.set_defaults(fn=cmd_score)

    s = stage_parser(
        "vocab", "Spark job: threshold pairs, count images per entity, assign classes", raw=False
    )
    s.add_argument("--run", required=True)
    s.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="absolute similarity threshold (implies --threshold-mode absolute)",
    )
    s.add_argument("--threshold-mode", choices=["calibrated", "absolute"], default=None)
    s.add_argument(
        "--null-quantile", type=float, default=None, help="calibrated: quantile of the null scores"
    )
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--min-count", type=int, default=None)
    s.add_argument("--master", default=None, help="Spark master (overrides the config)")
    s.add_argument("--deploy-mode", default=None, choices=["client", "cluster"])
    s.set_defaults(fn=cmd_vocab)

    s = stage_parser("write", "I2E WebDataset shards + Parquet sidecars + sizes.json", kb=False)
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True, help="I2E root URI")
    s.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="samples per output shard (0: keep input sharding)",
    )
    s.add_argument("--shards", default=None, help="only these output shards (comma list)")
    s.set_defaults(fn=cmd_write)

    s = stage_parser("build-i2e", "all I2E stages in order (resumable)")
    s.add_argument("--out", required=True, help="I2E root URI")
    s.add_argument(
        "--run", default=None, help="work root for intermediate stages (default: OUT/../i2e_run)"
    )
    s.set_defaults(fn=cmd_build_i2e)

    s = sub.add_parser("train", help="MOFI training through torchrun (DDP; resumable)")
    s.add_argument("--i2e", required=True, help="I2E root URI (from mofi build-i2e)")
    s.add_argument("--out", required=True, help="run folder: checkpoints, logs, model.pt")
    s.add_argument("--config", default="demo", help="named training config (mofi config list)")
    s.add_argument("--config-file", default="", help="a saved TrainConfig JSON")
    s.add_argument("--mode", choices=["multitask", "supervised", "contrastive"], default=None)
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None, help="per process")
    s.add_argument("--nproc-per-node", type=int, default=None)
    s.add_argument("--nnodes", type=int, default=None)
    s.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT for multi-node")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
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

    s = sub.add_parser(
        "demo", help="the main job end to end through a local Airflow (what `make demo` runs)"
    )
    s.add_argument("--run", default="runs/demo", help="run folder: inputs, outputs, Airflow home")
    s.add_argument("--pairs", type=int, default=5000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--keep", action="store_true", help="leave Airflow running for the UI")
    s.add_argument("--port", type=int, default=None, help="api-server port (default 8080)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("airflow", help="a local Airflow (SQLite, LocalExecutor): up, down, status")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--run", default="runs/demo", help="run root the DAGs default to")
    s.add_argument("--home", default=None, help="AIRFLOW_HOME (default RUN/airflow)")
    s.add_argument("--port", type=int, default=None, help="api-server port (default 8080)")
    s.set_defaults(fn=cmd_airflow)

    s = sub.add_parser("status", help="shard progress of a run, read from its markers")
    s.add_argument("run", help="run or build root URI (stages are found at any depth below it)")
    s.add_argument("--json", action="store_true", help="machine-readable output for dashboards")
    s.add_argument(
        "--watch", type=float, default=0, metavar="SECONDS", help="refresh every SECONDS"
    )
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser(
        "dashboard", help="serve the shard-progress page, its JSON and /metrics (read-only)"
    )
    s.add_argument(
        "--roots", nargs="+", required=True, metavar="URI", help="run roots (local or s3://)"
    )
    s.add_argument(
        "--results",
        default=None,
        help="SQLAlchemy URL of the results store (default: $MOFI_RESULTS_URL or runs/results.sqlite)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--refresh", type=float, default=3.0, help="page refresh interval (seconds)")
    s.set_defaults(fn=cmd_dashboard)

    s = sub.add_parser("config", help="list, show or document the named configs")
    s.add_argument("action", choices=["list", "show", "doc"])
    s.add_argument("name", nargs="?", default="demo")
    s.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(0 if args.quiet else args.verbose)
    from training.core.storage import StorageError

    try:
        return int(args.fn(args) or 0)
    except (ConfigError, FileNotFoundError, StorageError) as exc:
        # bad input, configuration or storage (unreachable endpoint, no permission): one line
        msg = " ".join(str(exc).split())
        print(f"mofi {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a stage failed; its markers say which shards
        print(f"mofi {args.cmd}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"mofi {args.cmd}: interrupted; completed shards keep their markers, re-run to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
