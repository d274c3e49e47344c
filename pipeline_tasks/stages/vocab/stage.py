"""`mofi vocab`: the Spark job that filters (image, entity) pairs and builds the entity vocabulary.

Scores each candidate pair (similarity plus visual coherence), keeps an image's best
``top_k`` above a threshold calibrated on the run's own scores (or an absolute one for a
scorer of known scale), counts images per entity, drops entities seen too rarely, and
assigns class indices in entity-id order (the same kept set always gives the same indices);
see :mod:`.filtering` for each rule. An empty or collapsed output fails with
a message naming the setting to change. Writes

* ``RUN/vocab/vocab.parquet``: entity_id, name, description, n_images, class_index;
* ``RUN/labels/{shard}.parquet``: key, entity_ids, class_indices, similarities, the kept
  labels of every image with at least one, which ``mofi write`` turns into I2E shards.
"""

from __future__ import annotations

import dataclasses
import os

import pyarrow as pa

from training.core import config as cfg
from training.core import storage
from training.core.i2e import VOCAB_FILE

from ...runtime.executor import ShardTask, StageResult, stage_lease
from ...runtime.layout import HYGIENE, LABELS, SCORE, VOCAB, RunLayout
from ...runtime.markers import WHOLE_STAGE, completed_shards
from ...runtime.spark import SparkConfig, run_spark_stage
from .filtering import FilterError

# which dropped.parquet of the hygiene stage the vocabulary and labels left out
HYGIENE_INPUT = "_hygiene_input.json"

STAGE = VOCAB
LABELS_STAGE = LABELS
JOB_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "job.py")
VOCAB_SCHEMA = pa.schema(
    [
        ("entity_id", pa.string()),
        ("name", pa.string()),
        ("description", pa.string()),
        ("n_images", pa.int64()),
        ("class_index", pa.int64()),
    ]
)
LABELS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("entity_ids", pa.list_(pa.string())),
        ("class_indices", pa.list_(pa.int64())),
        ("similarities", pa.list_(pa.float32())),
    ]
)


@dataclasses.dataclass
class VocabConfig(cfg.StageConfig):
    """Which (image, entity) pairs survive, and which entities become classes."""

    threshold_mode: str = cfg.field(
        "calibrated",
        "calibrated (the threshold is read off each run's own scores: see null_quantile) or "
        "absolute (threshold, for a scorer of known scale such as a CLIP)",
    )
    null_quantile: float = cfg.field(
        0.85,
        "calibrated: a kept pair scores above this quantile of the scores of each image's "
        "non-best candidates (the null)",
    )
    min_null_pairs: int = cfg.field(
        200, "calibrated: fewer null scores than this cannot calibrate (an error, not a guess)"
    )
    coherence_weight: float = cfg.field(
        2.0,
        "calibrated: score = similarity + this x visual coherence (the image's visual features "
        "against the mean of the other images linking the entity; 0: similarity alone)",
    )
    threshold: float = cfg.field(
        0.4,
        "absolute: keep pairs with similarity >= this (scorer-specific; see README)",
    )
    top_k: int = cfg.field(1, "keep at most this many entities per image, best first (0: no limit)")
    entity_quantile: float = cfg.field(
        0.0, "also drop pairs below this quantile of their entity's similarities (0: off)"
    )
    min_count: int = cfg.field(
        3, "entities on fewer images are dropped (the paper keeps entities seen often enough)"
    )
    min_count_max_drop: float = cfg.field(
        0.15,
        "min_count is lowered until the entities it drops hold at most this share of the kept "
        "labels (small corpora; 1.0: always apply min_count). An entity on one image has no "
        "other image to agree with it (no coherence): measured at 500 and 1,000 pairs, half "
        "of such labels are wrong, so they go while they hold under this share",
    )
    min_kept_fraction: float = cfg.field(
        0.05,
        "fail when fewer scored images than this share keep a label (an empty or collapsed "
        "output is an error, not a result)",
    )
    spark: SparkConfig = cfg.field(factory=SparkConfig, doc="Spark settings")

    def validate(self) -> None:
        self._check(
            self.threshold_mode in ("calibrated", "absolute"),
            "threshold_mode",
            "calibrated or absolute",
        )
        self._check(0.0 < self.null_quantile < 1.0, "null_quantile", "must be in (0, 1)")
        self._check(self.min_null_pairs >= 1, "min_null_pairs", "must be >= 1")
        self._check(self.coherence_weight >= 0, "coherence_weight", "must be >= 0")
        self._check(-1.0 <= self.threshold <= 1.0, "threshold", "cosine similarity: in [-1, 1]")
        self._check(self.top_k >= 0, "top_k", "must be >= 0")
        self._check(0.0 <= self.entity_quantile < 1.0, "entity_quantile", "must be in [0, 1)")
        self._check(self.min_count >= 1, "min_count", "must be >= 1")
        self._check(
            0.0 <= self.min_count_max_drop <= 1.0, "min_count_max_drop", "must be in [0, 1]"
        )
        self._check(0.0 <= self.min_kept_fraction < 1.0, "min_kept_fraction", "must be in [0, 1)")


def run_vocab(config: VocabConfig, run_uri: str, kb_uri: str, progress: bool = True) -> StageResult:
    from ..kb.stage import load_kb

    load_kb(kb_uri)
    storage.check_writable(run_uri)
    layout = RunLayout(run_uri)
    with stage_lease(layout.store(STAGE)):
        return _run_vocab(config, layout, kb_uri, progress)


def _run_vocab(config: VocabConfig, layout: RunLayout, kb_uri: str, progress: bool) -> StageResult:
    done = completed_shards(layout.store(SCORE), "score")
    vocab_dir, labels_dir = layout.stage_dir(STAGE), layout.stage_dir(LABELS_STAGE)
    vstore, lstore = layout.store(STAGE), layout.store(LABELS_STAGE)
    result = StageResult(stage=STAGE, out=vocab_dir, shards=len(done))
    saved = storage.join(vocab_dir, VocabConfig.file_name())
    if (
        vstore.is_done(WHOLE_STAGE)
        and storage.exists(saved)
        and storage.read_text(saved).strip() != config.to_json().strip()
    ):
        raise cfg.ConfigError(
            f"{vocab_dir} was built with another vocab config; use a new run URI or delete {vocab_dir} and {labels_dir}"
        )
    dropped = _dropped_digest(layout)
    record = storage.join(vocab_dir, HYGIENE_INPUT)
    if vstore.is_done(WHOLE_STAGE):
        used = storage.read_json(record).get("dropped_sha256") if storage.exists(record) else ""
        if used != dropped:  # the hygiene stage dropped other images: vocab and labels redone
            vstore.unmark_done(WHOLE_STAGE)
            for s in done:
                lstore.unmark_done(s)
    vstore.write_plan([WHOLE_STAGE])
    lstore.write_plan(done)
    config.save(vocab_dir)

    def spec(_todo: list[list[ShardTask]]) -> dict:
        return {
            "score_files": [[s, layout.output(SCORE, s)] for s in done],
            "embedding_files": [[s, layout.image_embeddings(s)] for s in done],
            "dropped_file": layout.hygiene_dropped
            if storage.exists(layout.hygiene_dropped)
            else None,
            "kb_uri": kb_uri,
            "run_uri": layout.root,
            "config": config.to_dict(),
        }

    try:  # the vocabulary and every shard's labels come from one job: redone together
        run_spark_stage(
            JOB_SCRIPT,
            config.spark,
            STAGE,
            [(lstore, [ShardTask(s) for s in done]), (vstore, [ShardTask(WHOLE_STAGE)])],
            spec,
            result,
            layout.local_work_dir(),
            progress,
            whole=True,
        )
    except RuntimeError as exc:
        failed = vstore.read_all().get(WHOLE_STAGE, {})
        if failed.get("state") == "failed" and failed.get("error", "").startswith("filter:"):
            # the job refused to publish an empty or untrustworthy output: say why, in one line
            raise FilterError(failed["error"][len("filter: ") :]) from exc
        raise
    st = vstore.read_done(WHOLE_STAGE)
    if st is not None:
        storage.write_json(record, {"dropped_sha256": dropped})
    if st is None:
        recs = vstore.read_all()
        raise RuntimeError(
            f"vocab job finished without a vocabulary: {recs.get(WHOLE_STAGE, {}).get('error', 'no marker')}"
        )
    result.extra.update(skipped=not result.processed, vocab=layout.vocab_file, **(st.extra or {}))
    return result


def _dropped_digest(layout: RunLayout) -> str:
    """sha256 of the hygiene stage's dropped.parquet, as its done marker vouches for it (the
    file is not read again); "" when the run has none. A dropped file that no finished
    hygiene stage vouches for (the stage is running again, or died) is refused."""
    from ...runtime.markers import relative_name

    uri = layout.hygiene_dropped
    if not storage.exists(uri):
        return ""
    store = layout.store(HYGIENE)
    st = store.read_done(WHOLE_STAGE)
    rec = (st.outputs if st else {}).get(relative_name(store.root, uri))
    if not rec:
        raise cfg.ConfigError(
            f"{uri} is not vouched for by a finished hygiene stage: run `mofi hygiene --run "
            f"{layout.root}` to the end, then vocab"
        )
    return rec["sha256"]


def load_vocab(uri: str) -> pa.Table:
    import pyarrow.parquet as pq

    path = uri if uri.endswith(".parquet") else storage.join(uri, VOCAB_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"no vocabulary at {path}: run `mofi vocab` first")
    with storage.open_read(path) as f:
        return pq.read_table(f)
