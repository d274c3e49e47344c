"""Named corpus configs of the demo (``mofi corpus --config NAME``)."""

from __future__ import annotations

from collections.abc import Callable

from training.core.config import ConfigError

from .corpus import CorpusConfig


def cpu_test() -> CorpusConfig:
    """Tiny and fast: unit and integration tests on 2 CPU cores (seconds)."""
    return CorpusConfig(
        pairs=64, shard_size=16, workers=1, min_side=64, max_side=96, cache_max_side=128
    )


def demo() -> CorpusConfig:
    """The README's `make demo`: 5,000 pairs in 5 shards, 2 workers."""
    return CorpusConfig(pairs=5000, shard_size=1000, workers=2)


def production() -> CorpusConfig:
    """Production-sized pictures (224-512 px), large shards, many workers (benchmarks)."""
    return CorpusConfig(
        pairs=1_000_000,
        shard_size=10_000,
        workers=16,
        min_side=224,
        max_side=512,
        cache_max_side=512,
    )


RECIPES: dict[str, Callable[[], CorpusConfig]] = {
    "cpu_test": cpu_test,
    "demo": demo,
    "production": production,
}


def get(name: str) -> CorpusConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown corpus config {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]()
