"""The data engineer's commands: each I2E stage on its own, and all of them (`build-i2e`)."""

from __future__ import annotations

import argparse
import time

from .common import (
    Overrides,
    config_kind,
    flag_value,
    pipeline_config,
    print_result,
    shard_list,
)


def cmd_kb(args: argparse.Namespace) -> int:
    from pipeline_tasks.stages.kb.stage import build_kb

    config = pipeline_config(args).kb
    t0 = time.time()
    stats = build_kb(config, args.out)
    drops = ", ".join(f"{k}={v}" for k, v in stats.drops.items()) or "none"
    print(
        f"kb: {stats.n_out} entities from {stats.n_in} rows -> {args.out} ({time.time() - t0:.1f}s); skipped: {drops}"
    )
    return 0


def cmd_ner(args: argparse.Namespace) -> int:
    from pipeline_tasks.stages.ner.stage import run_ner

    c = pipeline_config(args).ner
    res = run_ner(
        c, args.raw, args.kb, args.run, progress=not args.no_progress, reuse_from=args.reuse_from
    )
    print_result("ner", res)
    return 1 if res.failed else 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from pipeline_tasks.runtime.layout import RunLayout
    from pipeline_tasks.stages.score.bootstrap import bootstrap_scorer

    c = pipeline_config(args).bootstrap
    out = args.out or RunLayout(args.run).scorer_checkpoint
    res = bootstrap_scorer(c, args.raw, out, args.run, args.kb, progress=not args.no_progress)
    print_result("scorer-bootstrap", res)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline_tasks.stages.score.stage import ensure_scorer, run_score

    p = pipeline_config(args)
    if args.bootstrap_if_missing or args.retrain_scorer:
        boot = ensure_scorer(
            p.score,
            p.bootstrap,
            args.raw,
            args.kb,
            args.run,
            progress=not args.no_progress,
            reuse_from=args.reuse_from,
            retrain=args.retrain_scorer,
        )
        if boot is not None:
            print_result("scorer-bootstrap", boot)
    res = run_score(
        p.score,
        args.raw,
        args.run,
        args.kb,
        progress=not args.no_progress,
        reference_every=args.reference_every,
        only=shard_list(args.shards),
        prepare=args.prepare,
        reuse_from=args.reuse_from,
    )
    print_result("score", res)
    return 1 if res.failed else 0


def vocab_config(args: argparse.Namespace):
    """The vocab config of a `mofi vocab` command: an explicit threshold is an absolute one
    unless --threshold-mode says otherwise."""
    explicit = flag_value(args, "vocab.threshold") is not None
    mode_given = flag_value(args, "vocab.threshold_mode") is not None
    implied = [("vocab.threshold_mode", "absolute")] if explicit and not mode_given else []
    return pipeline_config(args, implied).vocab


def cmd_vocab(args: argparse.Namespace) -> int:
    from pipeline_tasks.stages.vocab.stage import run_vocab

    res = run_vocab(vocab_config(args), args.run, args.kb, progress=not args.no_progress)
    print_result("vocab", res)
    return 1 if res.failed else 0


def cmd_write(args: argparse.Namespace) -> int:
    from pipeline_tasks.stages.write.stage import run_write

    c = pipeline_config(args).write
    res = run_write(
        c, args.raw, args.run, args.out, progress=not args.no_progress, only=shard_list(args.shards)
    )
    print_result("write", res)
    return 1 if res.failed else 0


def cmd_build_i2e(args: argparse.Namespace) -> int:
    from pipeline_tasks.build import build_i2e
    from pipeline_tasks.runtime.layout import RunLayout

    p = pipeline_config(args)
    run = args.run or RunLayout.beside(args.out).root
    t0 = time.time()
    res = build_i2e(
        p,
        args.raw,
        args.kb,
        run,
        args.out,
        progress=not args.no_progress,
        reuse_from=args.reuse_from,
        retrain_scorer=args.retrain_scorer,
    )
    w = res["write"]
    print(
        f"build-i2e: {w['num_samples']} images, {w['num_classes']} classes in {w['num_shards']} shards -> {args.out} ({time.time() - t0:.0f}s); work files in {run}"
    )
    return 0


def _reuse_flags(s, scorer: bool = True) -> None:
    s.add_argument(
        "--reuse-from",
        default=None,
        metavar="BUILD",
        help="incremental rebuild: copy each shard's output from this earlier build (a version "
        "root, its i2e or i2e_run, or a run root) when nothing it depends on changed",
    )
    if scorer:
        s.add_argument(
            "--retrain-scorer",
            action="store_true",
            help="bootstrap a new packaged scorer instead of keeping --reuse-from's (every "
            "shard is then scored again)",
        )


def _pipeline_recipes():
    from pipeline_tasks import recipes

    return recipes


def _stage_parser(sub, name: str, help: str, raw: bool = True, kb: bool = True):
    sp = sub.add_parser(name, help=help)
    if raw:
        sp.add_argument("--raw", required=True, help="raw corpus root (img2dataset layout)")
    if kb:
        sp.add_argument("--kb", required=True, help="KB root URI")
    sp.add_argument("--config", default="demo", help="named config (mofi config list)")
    sp.add_argument("--no-progress", action="store_true")
    return sp, Overrides(sp)


def _spark_flags(ov: Overrides, stage: str) -> None:
    # an Airflow task passes its spark_default connection's master and deploy mode
    ov.flag("--master", f"{stage}.spark.master", help="Spark master (overrides the config)")
    ov.flag("--deploy-mode", f"{stage}.spark.deploy_mode", choices=["client", "cluster"])


def add_commands(sub) -> None:
    config_kind(
        "", "pipeline configs (mofi kb/ner/score/.../build-i2e --config NAME):", _pipeline_recipes
    )

    s = sub.add_parser("kb", help="build the knowledge base (entities.parquet)")
    s.add_argument("--out", required=True, help="KB root URI (local path or s3://)")
    s.add_argument("--config", default="demo", help="named config (mofi config list)")
    Overrides(s, "kb.max_summary_chars=300").flag(
        "--source",
        "kb.sources",
        action="append",
        help="a builtin source (vital, countries, cities) or a KB table path/URI; repeatable; replaces the config's sources",
    ).flag("--min-city-population", "kb.min_city_population", type=int)
    s.set_defaults(fn=cmd_kb)

    s, ov = _stage_parser(sub, "ner", "Spark job: NER + KB linking over raw captions")
    s.add_argument("--out", "--run", dest="run", required=True, help="run root URI; writes RUN/ner")
    _spark_flags(ov, "ner")
    _reuse_flags(s, scorer=False)
    s.set_defaults(fn=cmd_ner)

    s, ov = _stage_parser(
        sub, "scorer-bootstrap", "train the packaged CLIP-style scorer's heads on the raw corpus"
    )
    s.add_argument(
        "--run", required=True, help="run root URI (reads RUN/ner for the entity objective)"
    )
    s.add_argument("--out", default=None, help="checkpoint URI (default RUN/scorer/packaged.pt)")
    ov.flag("--objective", "bootstrap.objective", choices=["entity", "caption"])
    s.set_defaults(fn=cmd_bootstrap)
    _add_score(sub)
    _add_filter_and_write(sub)


def _add_score(sub) -> None:
    s, ov = _stage_parser(sub, "score", "image/entity similarity workers (one per device)")
    s.add_argument("--run", required=True, help="run root URI; reads RUN/ner, writes RUN/score")
    ov.flag("--backend", "score.backend", choices=["packaged", "open_clip", "mofi"])
    ov.flag("--model", "score.model", help="checkpoint URI, or for open_clip ARCH[:TAG_OR_PATH]")
    ov.flag("--devices", "score.devices", help="auto, cpu, or cuda:0,cuda:1")
    ov.flag("--batch-size", "score.batch_size", type=int)
    ov.flag(
        "--decode",
        "score.decode",
        choices=["auto", "device", "processes", "threads"],
        help="decode on the device (GPUs: nvJPEG), in loader processes overlapped with the model, or in threads between forward passes (CPU); auto picks by device",
    )
    ov.flag(
        "--loader-workers",
        "score.loader_workers",
        type=int,
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
    _reuse_flags(s)
    s.set_defaults(fn=cmd_score)


def cmd_hygiene(args: argparse.Namespace) -> int:
    from pipeline_tasks.stages.hygiene.stage import run_hygiene

    c = pipeline_config(args)
    res = run_hygiene(c.hygiene, c.score, args.run, progress=not args.no_progress)
    print_result("hygiene", res)
    return 1 if res.failed else 0


def _add_filter_and_write(sub) -> None:
    s, ov = _stage_parser(
        sub,
        "hygiene",
        "Spark job (one process for small pools): drop duplicates, copies of evaluation "
        "images and unsafe images",
        raw=False,
        kb=False,
    )
    s.add_argument("--run", required=True)
    ov.flag("--near-threshold", "hygiene.near_threshold", type=float)
    ov.flag("--eval-threshold", "hygiene.eval_threshold", type=float)
    ov.flag("--phash-distance", "hygiene.phash_distance", type=int)
    ov.flag(
        "--eval-folder",
        "hygiene.eval_folders",
        action="append",
        metavar="DIR",
        help="an evaluation folder whose copies are dropped (repeatable)",
    )
    ov.flag(
        "--local-max-images",
        "hygiene.local_max_images",
        type=int,
        metavar="N",
        help="a pool of at most N images is done in this process, a larger one by Spark "
        "(0: always Spark)",
    )
    _spark_flags(ov, "hygiene")
    s.set_defaults(fn=cmd_hygiene)

    s, ov = _stage_parser(
        sub,
        "vocab",
        "Spark job: threshold pairs, count images per entity, assign classes",
        raw=False,
    )
    s.add_argument("--run", required=True)
    ov.flag(
        "--threshold",
        "vocab.threshold",
        type=float,
        help="absolute similarity threshold (implies --threshold-mode absolute)",
    )
    ov.flag("--threshold-mode", "vocab.threshold_mode", choices=["calibrated", "absolute"])
    ov.flag(
        "--null-quantile",
        "vocab.null_quantile",
        type=float,
        help="calibrated: quantile of the null scores",
    )
    ov.flag("--top-k", "vocab.top_k", type=int)
    ov.flag("--min-count", "vocab.min_count", type=int)
    _spark_flags(ov, "vocab")
    s.set_defaults(fn=cmd_vocab)

    s, ov = _stage_parser(
        sub, "write", "I2E WebDataset shards + Parquet sidecars + sizes.json", kb=False
    )
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True, help="I2E root URI")
    ov.flag(
        "--shard-size",
        "write.shard_size",
        type=int,
        help="samples per output shard (0: keep input sharding)",
    )
    s.add_argument("--shards", default=None, help="only these output shards (comma list)")
    s.set_defaults(fn=cmd_write)

    s, _ = _stage_parser(sub, "build-i2e", "all I2E stages in order (resumable)")
    s.add_argument("--out", required=True, help="I2E root URI")
    s.add_argument(
        "--run", default=None, help="work root for intermediate stages (default: OUT/../i2e_run)"
    )
    _reuse_flags(s)
    s.set_defaults(fn=cmd_build_i2e)
