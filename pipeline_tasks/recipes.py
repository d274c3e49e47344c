"""Named configs: small functions deriving from one base. ``mofi config list`` shows them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from training.core.config import ConfigError, StageConfig

from .bootstrap import BootstrapConfig
from .corpus import CorpusConfig
from .kb import KBConfig
from .ner import NerConfig
from .scoring import ScoreConfig
from .vocab import VocabConfig
from .write import WriteConfig


@dataclasses.dataclass
class PipelineConfig:
    """One config per stage; later stages add their fields here."""

    name: str
    kb: KBConfig
    corpus: CorpusConfig
    ner: NerConfig = dataclasses.field(default_factory=NerConfig)
    bootstrap: BootstrapConfig = dataclasses.field(default_factory=BootstrapConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    vocab: VocabConfig = dataclasses.field(default_factory=VocabConfig)
    write: WriteConfig = dataclasses.field(default_factory=WriteConfig)

    def stages(self) -> list[StageConfig]:
        return [
            getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), StageConfig)
        ]

    def to_json(self) -> str:
        return json.dumps(
            {"name": self.name, **{s.stage_name(): s.to_dict() for s in self.stages()}},
            indent=2,
            sort_keys=True,
        )


def base() -> PipelineConfig:
    return PipelineConfig(name="base", kb=KBConfig(), corpus=CorpusConfig())


def cpu_test() -> PipelineConfig:
    """Tiny and fast: unit and integration tests on 2 CPU cores (seconds)."""
    b = base()
    return dataclasses.replace(
        b,
        name="cpu_test",
        kb=b.kb.replace(sources=("vital", "countries"), max_summary_chars=200),
        corpus=b.corpus.replace(
            pairs=64, shard_size=16, workers=1, min_side=64, max_side=96, cache_max_side=128
        ),
    )


def demo() -> PipelineConfig:
    """The README's `make demo`: 5,000 pairs on a laptop-sized machine (a minute or two)."""
    b = base()
    return dataclasses.replace(
        b,
        name="demo",
        corpus=b.corpus.replace(pairs=5000, shard_size=1000, workers=2),
        # batches of 32 on CPU: faster per image than 128 here, and activations stay under the
        # scoring worker's 64 MB heap threshold
        score=b.score.replace(batch_size=32),
        # ~17 I2E shards of 250: enough to deal evenly to the training ranks
        write=b.write.replace(shard_size=250),
    )


def production() -> PipelineConfig:
    """Example of a cluster-sized build: user KB table on S3, large shards, many workers."""
    b = base()
    return dataclasses.replace(
        b,
        name="production",
        kb=b.kb.replace(sources=("vital", "countries", "cities"), min_city_population=100_000),
        corpus=b.corpus.replace(
            pairs=1_000_000,
            shard_size=10_000,
            workers=16,
            min_side=224,
            max_side=512,
            cache_max_side=512,
        ),
    )


RECIPES: dict[str, Callable[[], PipelineConfig]] = {
    "cpu_test": cpu_test,
    "demo": demo,
    "production": production,
}


def get(name: str) -> PipelineConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown config {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]()
