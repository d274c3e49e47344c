"""What every subcommand shares: config overrides from flags, result printing, shard lists.

A command's config is a named recipe (``--config NAME``) with overrides on top, all applied
by :class:`Overrides`: the named flags users rely on (``--batch-size``, ``--master``, ...)
each stand for one config path, and ``--set PATH=VALUE`` (repeatable) reaches any field
(``mofi config doc NAME`` lists them), e.g. ``--set score.batch_size=64``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from training.core.config import apply_overrides, parse_assignment

_PREFIX = "set:"
# `mofi config`'s kinds of named configs, registered by the module whose commands use them:
# prefix ("" for pipeline configs, "train", "corpus") -> (title, loader of its recipes module)
CONFIG_KINDS: dict[str, tuple[str, Callable[[], Any]]] = {}


def config_kind(prefix: str, title: str, load_recipes: Callable[[], Any]) -> None:
    CONFIG_KINDS[prefix] = (title, load_recipes)


class Overrides:
    """Named flags of one subcommand, each bound to a config path, plus ``--set``."""

    def __init__(self, parser: argparse.ArgumentParser, example: str = "score.batch_size=64"):
        self.parser = parser
        parser.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="PATH=VALUE",
            help=f"set any config field (repeatable; `mofi config doc NAME` lists them), e.g. {example}",
        )

    def flag(self, flag: str, path: str, **kw: Any) -> Overrides:
        """``flag`` sets ``path`` when given (its default is None: not given)."""
        self.parser.add_argument(flag, dest=_PREFIX + path, default=None, **kw)
        return self


def flag_value(args: argparse.Namespace, path: str) -> Any:
    """The value of the named flag bound to ``path`` (None when not given)."""
    return getattr(args, _PREFIX + path, None)


def given(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(path, value) of every named override flag that was given, then every ``--set``."""
    named = [
        (k[len(_PREFIX) :], v)
        for k, v in vars(args).items()
        if k.startswith(_PREFIX) and v is not None
    ]
    return named + [parse_assignment(a) for a in getattr(args, "overrides", None) or []]


def with_overrides(config: Any, args: argparse.Namespace, extra: list | None = None) -> Any:
    """``config`` with the flags' and ``--set``'s values (``extra`` first)."""
    return apply_overrides(config, list(extra or []) + given(args))


def pipeline_config(args: argparse.Namespace, extra: list | None = None):
    """The named pipeline config (``--config``) with this command's overrides."""
    from pipeline_tasks import recipes

    return with_overrides(recipes.get(args.config), args, extra)


def print_result(name: str, res: Any) -> None:
    d = res.to_dict() if hasattr(res, "to_dict") else res
    print(f"{name}: " + json.dumps(d, sort_keys=True, default=str))


def shard_list(arg: str | None) -> list[str] | None:
    """``--shards 00000,00003`` -> ids; None means every planned shard."""
    if not arg:
        return None
    return [s.strip() for s in arg.split(",") if s.strip()]
