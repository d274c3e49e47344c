"""Operating the system: shard status, the dashboard, the named configs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from training.core.config import ConfigError

from .common import CONFIG_KINDS


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline_tasks.runtime import status

    while True:
        summaries = status.summarize_run(args.run, sealed=not args.verify)
        if args.json:
            print(status.to_json(args.run, summaries))
        else:
            print(status.render(summaries, args.run, shards=args.shards))
        if not args.watch:
            break
        time.sleep(args.watch)
        print()
    return 1 if any(s["failed"] or s["invalid"] for s in summaries) else 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from pipeline_tasks.dashboard.app import serve
    from pipeline_tasks.dashboard.auth import TokenError, check_bind, load_token
    from pipeline_tasks.dashboard.config import DashboardConfig

    config = DashboardConfig(
        roots=tuple(args.roots), results_url=args.results or "", refresh_s=args.refresh
    )
    try:
        token = load_token(args.token_file)
        check_bind(args.host, token)
    except TokenError as exc:
        print(f"mofi dashboard: {exc}", file=sys.stderr)
        return 2
    guarded = " (token required)" if token else ""
    print(
        f"dashboard: http://{args.host}:{args.port}/{guarded} (metrics at /metrics); "
        "Ctrl-C stops it"
    )
    serve(config, host=args.host, port=args.port, token=token)
    return 0


def _named_config(name: str):
    """(kind, config) for ``NAME`` (a pipeline config) or ``KIND:NAME`` (``train``, ...)."""
    kind, _, short = name.rpartition(":")
    if kind not in CONFIG_KINDS:
        known = ", ".join(f"{k}:NAME" for k in CONFIG_KINDS if k)
        raise ConfigError(f"unknown config kind {kind!r}: use NAME or {known}")
    return kind, CONFIG_KINDS[kind][1]().get(short)


def _list_configs() -> None:
    for title, load in CONFIG_KINDS.values():
        print(title)
        for name, fn in load().RECIPES.items():
            print(f"  {name:<12}{(fn.__doc__ or '').strip().splitlines()[0]}")


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "list":
        _list_configs()
        return 0
    kind, one = _named_config(args.name)
    if args.action == "show":
        print(one.to_json())
        return 0
    if kind:
        stages = [(kind, one)] + [
            (f.name, getattr(one, f.name))
            for f in dataclasses.fields(one)
            if hasattr(getattr(one, f.name), "describe")
        ]
    else:
        stages = [(st.stage_name(), st) for st in one.stages()]
    for label, stage in stages:
        print(f"[{label}]  {(type(stage).__doc__ or '').strip().splitlines()[0]}")
        for fname, _default, doc in type(stage).describe():
            value = getattr(stage, fname)
            shown = "(see below)" if hasattr(value, "describe") else repr(value)
            print(f"  {fname:<24}{shown:<28}{doc}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    import json
    import signal

    from pipeline_tasks.cluster import report as report_mod
    from pipeline_tasks.cluster import scenario

    def interrupted(signum, frame):  # SIGTERM too: the run's cleanup runs on the way out
        raise KeyboardInterrupt

    if args.stop:
        from pipeline_tasks.cluster import hosts

        print(f"cluster: removed {', '.join(hosts.cleanup()) or 'nothing (not running)'}")
        return 0
    signal.signal(signal.SIGTERM, interrupted)
    s = scenario.Settings(
        args.out, pairs=args.pairs, stamps=args.stamps, epochs=args.epochs, keep=args.keep
    )
    report = scenario.run(s)
    print(report_mod.render(report))
    print(f"cluster: report -> {args.out}/report.json")
    failed = [k for k in report_mod.CHECKS if not report.get(k)]
    if failed:
        print(f"cluster: failed checks: {failed}; {json.dumps(report.get('faults'))[:2000]}")
        return 1
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("status", help="shard progress of a run, read from its markers")
    s.add_argument("run", help="run or build root URI (stages are found at any depth below it)")
    s.add_argument("--json", action="store_true", help="machine-readable output for dashboards")
    s.add_argument(
        "--shards", action="store_true", help="also list every reused shard and its source"
    )
    s.add_argument(
        "--watch", type=float, default=0, metavar="SECONDS", help="refresh every SECONDS"
    )
    s.add_argument(
        "--verify",
        action="store_true",
        help="read every marker and check every output, also of sealed (complete) stages",
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
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; any other needs a token)",
    )
    s.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="require this token (first line of FILE; else $MOFI_DASHBOARD_TOKEN): "
        "Authorization: Bearer TOKEN, or open /?token=TOKEN once in a browser",
    )
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--refresh", type=float, default=3.0, help="page refresh interval (seconds)")
    s.set_defaults(fn=cmd_dashboard)

    s = sub.add_parser(
        "cluster",
        help="the deployment on network-namespace hosts (root): the pipeline across them, faults",
    )
    s.add_argument("--out", default="runs/cluster", help="hosts' folders and report.json")
    s.add_argument("--pairs", type=int, default=256, help="corpus size")
    s.add_argument("--epochs", type=int, default=8, help="training epochs")
    s.add_argument(
        "--stamps", default=None, help="picture folder (default: the demo's tuxpaint stamps)"
    )
    s.add_argument("--keep", action="store_true", help="leave it running (prints addresses)")
    s.add_argument("--stop", action="store_true", help="stop a kept deployment and remove it")
    s.set_defaults(fn=cmd_cluster)

    s = sub.add_parser("config", help="list, show or document the named configs")
    s.add_argument("action", choices=["list", "show", "doc"])
    s.add_argument("name", nargs="?", default="demo")
    s.set_defaults(fn=cmd_config)
