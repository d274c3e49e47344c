"""`mofi vocab`: the Spark job that filters (image, entity) pairs and builds the entity vocabulary.

Keeps a pair when its similarity passes the absolute threshold, and optionally when it is
among the image's top-k and above its entity's quantile; counts images per entity, drops
entities seen on fewer than ``min_count`` images, and assigns class indices in entity-id
order (the same kept set always gives the same indices). Writes

* ``RUN/vocab/vocab.parquet``: entity_id, name, description, n_images, class_index;
* ``RUN/labels/{shard}.parquet``: key, entity_ids, class_indices, similarities, the kept
  labels of every image with at least one, which ``mofi write`` turns into I2E shards.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pyarrow as pa

from training.core import config as cfg
from training.core import storage
from training.core.i2e import VOCAB_FILE

from .runtime.executor import StageResult, stage_lease
from .runtime.layout import LABELS, SCORE, VOCAB, RunLayout
from .runtime.markers import verify_done
from .runtime.spark import SparkConfig, run_spark_job

STAGE = VOCAB
LABELS_STAGE = LABELS
JOB_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spark_jobs", "vocab_job.py")
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

    threshold: float = cfg.field(
        0.4,
        "keep pairs with similarity >= this (scorer-specific: 0.4 for the packaged scorer, see README)",
    )
    top_k: int = cfg.field(
        1, "also keep at most this many entities per image, most similar first (0: no limit)"
    )
    entity_quantile: float = cfg.field(
        0.0, "also drop pairs below this quantile of their entity's similarities (0: off)"
    )
    min_count: int = cfg.field(
        3, "entities on fewer images are dropped (the paper keeps entities seen often enough)"
    )
    spark: SparkConfig = cfg.field(factory=SparkConfig, doc="Spark settings")

    def validate(self) -> None:
        self._check(-1.0 <= self.threshold <= 1.0, "threshold", "cosine similarity: in [-1, 1]")
        self._check(self.top_k >= 0, "top_k", "must be >= 0")
        self._check(0.0 <= self.entity_quantile < 1.0, "entity_quantile", "must be in [0, 1)")
        self._check(self.min_count >= 1, "min_count", "must be >= 1")


def run_vocab(config: VocabConfig, run_uri: str, kb_uri: str, progress: bool = True) -> StageResult:
    from .kb import load_kb

    load_kb(kb_uri)
    storage.check_writable(run_uri)
    layout = RunLayout(run_uri)
    with stage_lease(layout.store(STAGE)):
        return _run_vocab(config, layout, kb_uri, progress)


def _run_vocab(config: VocabConfig, layout: RunLayout, kb_uri: str, progress: bool) -> StageResult:
    score_store = layout.store(SCORE)
    plan = score_store.read_plan()
    if not plan:
        raise FileNotFoundError(
            f"no score stage under {layout.stage_dir(SCORE)}: run `mofi score` first"
        )
    checked = verify_done(score_store, plan["shards"])
    done = [s for s in plan["shards"] if checked[s] is None]
    pending = [s for s in plan["shards"] if s not in done]
    if pending:
        raise FileNotFoundError(
            f"score is not finished ({len(pending)} of {len(plan['shards'])} shards pending, e.g. "
            f"{ {s: checked[s] for s in pending[:3]} }): finish `mofi score` first"
        )
    vocab_dir, labels_dir = layout.stage_dir(STAGE), layout.stage_dir(LABELS_STAGE)
    vstore, lstore = layout.store(STAGE), layout.store(LABELS_STAGE)
    result = StageResult(stage=STAGE, out=vocab_dir, shards=len(done))
    fingerprint = config.to_json()
    saved = storage.join(vocab_dir, "vocab.config.json")
    if (
        vstore.is_done("00000")
        and storage.exists(saved)
        and storage.read_text(saved).strip() != fingerprint.strip()
    ):
        raise cfg.ConfigError(
            f"{vocab_dir} was built with another vocab config; use a new run URI or delete {vocab_dir} and {labels_dir}"
        )
    vcheck = verify_done(vstore, ["00000"])["00000"]
    lcheck = verify_done(lstore, done)
    if vcheck is None and all(v is None for v in lcheck.values()):
        result.extra.update(
            skipped=True, vocab=layout.vocab_file, **(vstore.read_done("00000").extra or {})
        )
        return result
    stale = {s: p for s, p in {"vocab": vcheck, **lcheck}.items() if p and p != "no done marker"}
    if stale:  # a published file no longer matches its marker: the whole job runs again
        result.redone.update(stale)
    for s in done:
        lstore.unmark_done(s)
    vstore.unmark_done("00000")
    vstore.write_plan(["00000"])
    lstore.write_plan(done)
    config.save(vocab_dir)
    spec = {
        "score_files": [[s, layout.output(SCORE, s)] for s in done],
        "kb_uri": kb_uri,
        "run_uri": layout.root,
        "config": config.to_dict(),
    }
    t0 = time.time()
    run_spark_job(
        JOB_SCRIPT,
        spec,
        config.spark,
        STAGE,
        lstore,
        done,
        progress,
        layout.local_work_dir(),
        extra_stores=[(vstore, ["00000"])],
    )
    result.processed = len(done)
    result.seconds = round(time.time() - t0, 2)
    st = vstore.read_done("00000")
    if st is None:
        recs = vstore.read_all()
        raise RuntimeError(
            f"vocab job finished without a vocabulary: {recs.get('00000', {}).get('error', 'no marker')}"
        )
    lrecs = lstore.read_all()
    for s in done:
        if lrecs.get(s, {}).get("state") != "done":
            result.failed[s] = lrecs.get(s, {}).get("error") or "not finished"
    result.extra.update(skipped=False, vocab=layout.vocab_file, **st.extra)
    return result


def load_vocab(uri: str) -> pa.Table:
    import pyarrow.parquet as pq

    path = uri if uri.endswith(".parquet") else storage.join(uri, VOCAB_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"no vocabulary at {path}: run `mofi vocab` first")
    with storage.open_read(path) as f:
        return pq.read_table(f)
