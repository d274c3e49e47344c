"""The demo's commands: its input (corpus, pictures, photographs), `mofi demo` end to end, and
the local Airflow it runs on. The only commands that load ``pipeline_tasks.demo``."""

from __future__ import annotations

import argparse
import json
import time

from .common import Overrides, config_kind, print_result, with_overrides


def cmd_corpus(args: argparse.Namespace) -> int:
    from pipeline_tasks.demo import corpus
    from pipeline_tasks.demo import recipes as demo_recipes

    config = with_overrides(demo_recipes.get(args.config), args)
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
        print_result("corpus", result)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline_tasks.demo import airflow_demo

    return airflow_demo.run_demo(args.run, args.pairs, args.seed, args.keep, args.port)


def cmd_airflow(args: argparse.Namespace) -> int:
    from pipeline_tasks.demo.layout import DemoLayout

    layout = DemoLayout(args.run)
    af = layout.local_airflow(
        args.port,
        home=args.home,
        eval_folders=layout.eval_folders(),
        val_folder=layout.validation_folder(),
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


def _corpus_recipes():
    from pipeline_tasks.demo import recipes

    return recipes


def add_commands(sub) -> None:
    config_kind(
        "corpus",
        "demo corpus configs (mofi corpus --config NAME; show with corpus:NAME):",
        _corpus_recipes,
    )
    s = sub.add_parser(
        "corpus", help="write the demo corpus (img2dataset layout) from real pictures"
    )
    s.add_argument("--out", required=True, help="raw corpus root URI")
    s.add_argument(
        "--kb", required=True, help="KB root URI (ground-truth entities are linked to it)"
    )
    ov = Overrides(s, "pairs=2000")
    ov.flag("--pairs", "pairs", type=int)
    ov.flag("--seed", "seed", type=int)
    ov.flag("--shard-size", "shard_size", type=int)
    ov.flag("--workers", "workers", type=int)
    ov.flag(
        "--stamps",
        "stamps_dir",
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
