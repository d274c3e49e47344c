"""The demo corpus's config and the schemas of what it writes."""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa

from training.core import config as cfg

STAGE = "corpus"
PICTURES_STAGE = "pictures"  # the source pictures' own bookkeeping (one whole-stage shard)
RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("sha256", pa.string()),
    ]
)
TRUTH_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("stamp_id", pa.string()),
        ("category", pa.string()),
        ("class_id", pa.int32()),
        ("true_entity_ids", pa.list_(pa.string())),
        ("distractor_entity_ids", pa.list_(pa.string())),
        ("mention", pa.string()),
        ("mentioned", pa.bool_()),
        ("misspelled", pa.bool_()),
    ]
)


@dataclasses.dataclass
class CorpusConfig(cfg.StageConfig):
    """How many noisy pairs to make from the real pictures, and how noisy."""

    pairs: int = cfg.field(5000, "number of image/alt-text pairs")
    seed: int = cfg.field(
        0, "random seed; the corpus is a pure function of (seed, config, pictures)"
    )
    shard_size: int = cfg.field(1000, "pairs per shard (img2dataset's default is 10000)")
    workers: int = cfg.field(2, "worker processes rendering shards")
    stamps_dir: str = cfg.field(
        "", "picture + caption folder (empty: data/stamps, fetched on first use)"
    )
    min_side: int = cfg.field(160, "smallest image side in pixels")
    max_side: int = cfg.field(288, "largest image side in pixels")
    crop_min_area: float = cfg.field(0.6, "random crops keep at least this fraction of the picture")
    jpeg_quality: tuple[int, int] = cfg.field((70, 95), "JPEG quality range")
    white_background_prob: float = cfg.field(0.25, "share of 'isolated on white' stock pictures")
    holdout_fraction: float = cfg.field(
        0.2, "share of each category's pictures held out for evaluation"
    )
    holdout_min_pictures: int = cfg.field(5, "categories with fewer pictures are not held out")
    val_fraction: float = cfg.field(
        0.1,
        "share of each held-out category's remaining pictures kept out of training as a "
        "validation folder (model selection, e.g. WiSE-FT's mixing weight); at least one",
    )
    val_renders: int = cfg.field(2, "renders of each validation picture (a class needs two images)")
    misspell_prob: float = cfg.field(0.08, "probability that the mention is misspelled")
    casing_prob: float = cfg.field(
        0.15, "probability of all-upper / all-lower / title-case alt-text"
    )
    no_mention_prob: float = cfg.field(
        0.03, "probability that the alt-text does not mention the subject"
    )
    max_distractors: int = cfg.field(
        2, "at most this many unrelated KB entities named in one alt-text"
    )
    cache_max_side: int = cfg.field(320, "pictures are kept in worker memory at most this large")

    def validate(self) -> None:
        self._check(self.pairs >= 1, "pairs", "must be >= 1")
        self._check(self.shard_size >= 1, "shard_size", "must be >= 1")
        self._check(self.workers >= 1, "workers", "must be >= 1")
        self._check(
            16 <= self.min_side <= self.max_side <= 4096,
            "min_side",
            "need 16 <= min_side <= max_side <= 4096",
        )
        self._check(0.1 <= self.crop_min_area <= 1.0, "crop_min_area", "must be in [0.1, 1]")
        lo, hi = self.jpeg_quality
        self._check(1 <= lo <= hi <= 100, "jpeg_quality", "need 1 <= low <= high <= 100")
        for name in (
            "white_background_prob",
            "holdout_fraction",
            "misspell_prob",
            "casing_prob",
            "no_mention_prob",
        ):
            self._check(0.0 <= getattr(self, name) <= 1.0, name, "must be a probability in [0, 1]")
        self._check(
            self.holdout_fraction < 1.0, "holdout_fraction", "must leave pictures for training"
        )
        self._check(self.holdout_min_pictures >= 2, "holdout_min_pictures", "must be >= 2")
        self._check(0.0 <= self.val_fraction < 0.5, "val_fraction", "must be in [0, 0.5)")
        self._check(self.val_renders >= 1, "val_renders", "must be >= 1")
        self._check(
            0 <= self.max_distractors <= 2,
            "max_distractors",
            "must be 0, 1 or 2 (one place and one person slot)",
        )

    @property
    def num_shards(self) -> int:
        return math.ceil(self.pairs / self.shard_size)
