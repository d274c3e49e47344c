"""The ``mofi`` command. Each subcommand is a thin parser over one library call; the
subcommands come from one module per audience:

* ``stages``: the data engineer's (kb, ner, scorer-bootstrap, score, vocab, write, build-i2e);
* ``train_eval``: ML ops' (train, eval, wise-ft, results);
* ``operations``: status, dashboard, config;
* ``demo``: the demo's input, `mofi demo` and its local Airflow.

Heavy imports (torch, Spark, spaCy) happen inside the subcommand that needs them, so
``mofi status`` answers in well under a second. Nothing imports this package.
"""

from __future__ import annotations

import argparse
import logging
import sys

from training.core.config import ConfigError

from . import demo, operations, stages, train_eval


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


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
    for module in (stages, train_eval, operations, demo):
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(0 if args.quiet else args.verbose)
    from training.core.inputs import InputError
    from training.core.storage import StorageError

    try:
        return int(args.fn(args) or 0)
    except (ConfigError, InputError, FileNotFoundError, StorageError) as exc:
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
