"""Named pipeline configs: small functions deriving from one base. ``mofi config list`` shows them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from training.core.config import ConfigError, StageConfig

from .stages.hygiene.stage import HygieneConfig
from .stages.kb.stage import KBConfig
from .stages.ner.stage import NerConfig
from .stages.score.config import BootstrapConfig, ScoreConfig
from .stages.vocab.stage import VocabConfig
from .stages.write.stage import WriteConfig


@dataclasses.dataclass
class PipelineConfig:
    """One config per stage of the I2E build (the demo's corpus has its own configs)."""

    name: str
    kb: KBConfig = dataclasses.field(default_factory=KBConfig)
    ner: NerConfig = dataclasses.field(default_factory=NerConfig)
    bootstrap: BootstrapConfig = dataclasses.field(default_factory=BootstrapConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    hygiene: HygieneConfig = dataclasses.field(default_factory=HygieneConfig)
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
    return PipelineConfig(name="base")


def cpu_test() -> PipelineConfig:
    """Tiny and fast: unit and integration tests on 2 CPU cores (seconds)."""
    b = base()
    return dataclasses.replace(
        b,
        name="cpu_test",
        kb=b.kb.replace(sources=("vital", "countries"), max_summary_chars=200),
        # test shards hold 16 images: one 16-image forward pass per shard instead of a
        # 128-image pass that is mostly padding (and 16 entity prompts per text pass): the
        # score stage on the 64-pair test corpus: 76 s -> 29 s (one run each, busy machine)
        score=b.score.replace(batch_size=16, text_batch_size=16),
        # test corpora are too small to calibrate on (tens of images): a fixed threshold
        vocab=b.vocab.replace(threshold_mode="absolute"),
        # the hygiene tests turn it on; every other test builds without its Spark job
        hygiene=b.hygiene.replace(
            exact_duplicates=False, near_duplicates=False, decontaminate=False, nsfw=False
        ),
    )


def demo() -> PipelineConfig:
    """The README's `make demo`: 5,000 pairs on a laptop-sized machine (a minute or two)."""
    b = base()
    return dataclasses.replace(
        b,
        name="demo",
        # batches of 32 on CPU: faster per image than 128 here, and activations stay under the
        # scoring worker's 64 MB heap threshold
        score=b.score.replace(batch_size=32),
        # ~17 I2E shards of 250: enough to deal evenly to the training ranks
        write=b.write.replace(shard_size=250),
        # the demo renders each picture many times on purpose (new background, place and
        # size each time): genuinely different pictures that chain into groups at 0.90
        # (8,000 pairs: 17 % dropped; 0.85: 55 %); at 0.95 only renders that came out nearly
        # the same go (0.8 %), and the demo keeps what it trains on
        hygiene=b.hygiene.replace(near_threshold=0.95),
    )


def production() -> PipelineConfig:
    """A cluster-sized build: open_clip ViT-B-32 scoring on GPUs, large shards, many workers.

    The scorer is ``ViT-B-32:laion2b_s34b_b79k`` from the hub; without hub access point
    ``score.model`` at local weights (``mofi score --model ViT-B-32:/path/ckpt.pt``)."""
    b = base()
    return dataclasses.replace(
        b,
        name="production",
        kb=b.kb.replace(sources=("vital", "countries", "cities"), min_city_population=100_000),
        score=b.score.replace(
            backend="open_clip", model="ViT-B-32:laion2b_s34b_b79k", batch_size=256, nsfw=True
        ),
        # every part of the hygiene stage on (see the README's hygiene section)
        hygiene=b.hygiene.replace(nsfw=True),
        # open_clip cosine similarities of an image and an entity prompt sit on a lower scale
        # than the packaged scorer's: see the README's filter section
        vocab=b.vocab.replace(threshold_mode="absolute", threshold=0.25, top_k=3),
        write=b.write.replace(shard_size=10_000, workers=8),
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
