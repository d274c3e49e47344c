"""`mofi hygiene`: drop unsafe images, copies of evaluation images and duplicates before vocab.

Runs between score and vocab, on what scoring kept for every scored image: its visual
embedding, its content hash (img2dataset's ``sha256`` column when the raw parquet has it,
else computed from the bytes the score stage read), its perceptual hash (``score/phash.py``)
and, when enabled, its NSFW score. The registered evaluation folders (``eval_folders``: the
GPR1200-layout folders `mofi eval` reads) are embedded and hashed once by the same scorer.
The Spark job (``job.py``) groups globally (a pool of at most ``local_max_images`` images:
the same steps in this process, ``local.py``, without Spark's fixed cost) and writes

* ``RUN/hygiene/dropped.parquet``: shard, key, reason, matched (the kept key or the eval
  file it copies), score (cosine, or the NSFW score), phash_distance (bits between the
  two perceptual hashes; null when either has none): what was dropped and why;
* the stage's marker, with every drop counted by reason (``mofi status``, the dashboard and
  ``/metrics`` show them) and the settings that made them.

``vocab`` leaves the dropped images out. Each part can be turned off; the production recipe
turns all on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pyarrow as pa

from training.core import config as cfg
from training.core import storage

from ...runtime.executor import ShardTask, StageResult, stage_lease
from ...runtime.layout import HYGIENE, SCORE, RunLayout
from ...runtime.markers import WHOLE_STAGE, completed_shards
from ...runtime.spark import SparkConfig, run_spark_stage
from . import lsh

STAGE = HYGIENE
JOB_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "job.py")
DROPPED_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("reason", pa.string()),
        ("matched", pa.string()),
        ("score", pa.float32()),
        ("phash_distance", pa.int32()),
    ]
)
EVAL_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("sha256", pa.string()),
        ("phash", pa.int64()),
    ]
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclasses.dataclass
class HygieneConfig(cfg.StageConfig):
    """Which images are removed before the vocabulary is built, and how they are found."""

    exact_duplicates: bool = cfg.field(True, "drop images whose bytes another image has")
    near_duplicates: bool = cfg.field(
        True, "drop images whose visual embedding is within near_threshold of another's"
    )
    near_threshold: float = cfg.field(
        0.90,
        "cosine of the scorer's visual features at or above which two images are copies "
        "(calibrated on planted copies: README, Hygiene)",
    )
    phash_distance: int = cfg.field(
        4,
        "two images are also copies when their perceptual hashes differ in at most this many "
        "of 64 bits and their features reach phash_min_cosine (resizes, re-encodes: "
        "README, Hygiene); -1: by features alone",
    )
    phash_min_cosine: float = cfg.field(
        0.5, "the cosine that a pair within phash_distance must also reach to be copies"
    )
    decontaminate: bool = cfg.field(
        True, "drop copies of the images in eval_folders (bytes or embedding)"
    )
    eval_threshold: float = cfg.field(
        0.90, "cosine at or above which a pool image copies an evaluation image"
    )
    eval_folders: tuple[str, ...] = cfg.field(
        (), "evaluation image folders (GPR1200 layout) whose copies are dropped"
    )
    nsfw: bool = cfg.field(False, "drop images whose NSFW score is at or above nsfw_threshold")
    nsfw_threshold: float = cfg.field(0.8, "Open NSFW probability at or above which an image goes")
    lsh_bits: int = cfg.field(16, "random hyperplanes per LSH table (more: smaller buckets)")
    lsh_recall: float = cfg.field(
        0.99, "the chance that a pair at the lowest threshold shares an LSH bucket"
    )
    max_bucket: int = cfg.field(
        2000, "a larger LSH bucket compares its members with its first max_bucket ones only"
    )
    seed: int = cfg.field(0, "seed of the LSH hyperplanes (the same seed: the same drops)")
    driver_groups_max_pairs: int = cfg.field(
        2_000_000,
        "near-duplicate groups are found on the driver when the copy pairs found are at most "
        "this many (one collect), else in Spark (large-star / small-star rounds)",
        output=False,
    )
    local_max_images: int = cfg.field(
        50_000,
        "a pool of at most this many scored images is done in this process with numpy "
        "(local.py: the same steps and drops; Spark's fixed cost, ~15 s, is most of the job "
        "below ~30,000 images), a larger one by the Spark job; 0: always Spark",
        output=False,
    )
    spark: SparkConfig = cfg.field(factory=SparkConfig, doc="Spark settings")

    def validate(self) -> None:
        for name in ("near_threshold", "eval_threshold"):
            self._check(0.0 < getattr(self, name) <= 1.0, name, "a cosine in (0, 1]")
        self._check(-1 <= self.phash_distance <= 15, "phash_distance", "in [-1, 15]")
        self._check(-1.0 <= self.phash_min_cosine <= 1.0, "phash_min_cosine", "in [-1, 1]")
        self._check(0.0 < self.nsfw_threshold <= 1.0, "nsfw_threshold", "in (0, 1]")
        self._check(1 <= self.lsh_bits <= 63, "lsh_bits", "in [1, 63]")
        self._check(0.5 <= self.lsh_recall < 1.0, "lsh_recall", "in [0.5, 1)")
        self._check(self.max_bucket >= 2, "max_bucket", "must be >= 2")
        self._check(self.driver_groups_max_pairs >= 0, "driver_groups_max_pairs", "must be >= 0")
        self._check(self.local_max_images >= 0, "local_max_images", "must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.exact_duplicates or self.near_duplicates or self.decontaminate or self.nsfw

    def lsh_tables(self) -> int:
        lowest = min(
            self.near_threshold if self.near_duplicates else 1.0,
            self.eval_threshold if self.decontaminate else 1.0,
        )
        return lsh.choose(lowest, self.lsh_recall, self.lsh_bits)

    def settings(self) -> dict[str, Any]:
        """What decided the drops (recorded with the stage and with every posted result)."""
        d = self.to_dict()
        d.pop("spark", None)
        d.pop("driver_groups_max_pairs", None)  # where the groups are found, not which
        d.pop("local_max_images", None)  # where the job runs, not what it drops
        d["lsh_tables"] = self.lsh_tables()
        return d


def eval_files(folders: tuple[str, ...]) -> list[str]:
    out = []
    for folder in folders:
        files = [f for f in storage.list_files(folder) if f.lower().endswith(IMAGE_SUFFIXES)]
        if not files:
            raise cfg.ConfigError(f"hygiene.eval_folders: no images in {folder}")
        out += sorted(files)
    return out


def run_hygiene(
    config: HygieneConfig, score_config, run_uri: str, progress: bool = True
) -> StageResult:
    storage.check_writable(run_uri)
    layout = RunLayout(run_uri)
    with stage_lease(layout.store(STAGE)):
        return _run_hygiene(config, score_config, layout, progress)


# what makes the pool's embeddings, hashes and NSFW scores: taken from the run's score stage
SCORED_WITH = ("backend", "model", "max_pixels", "precision", "nsfw")


def scored_with(score_config, layout: RunLayout):
    """``score_config`` with the fields that made the pool's embeddings as the run's score
    stage saved them (a DAG's ``score_model`` override, say): the evaluation images must be
    embedded by the same scorer, and the NSFW filter needs the scores to exist. Devices and
    batch sizes stay the caller's."""
    from ..score.config import ScoreConfig

    saved = storage.join(layout.stage_dir(SCORE), ScoreConfig.file_name())
    if not storage.exists(saved):
        return score_config
    ran = ScoreConfig.load(saved)
    return score_config.replace(**{k: getattr(ran, k) for k in SCORED_WITH})


def _run_hygiene(config: HygieneConfig, score_config, layout: RunLayout, progress) -> StageResult:
    from ..score.eval_embed import embed_eval_images

    score_config = scored_with(score_config, layout)
    if config.nsfw and not score_config.nsfw:
        raise cfg.ConfigError(
            "hygiene.nsfw filters by the NSFW score that the score stage computes only with "
            "score.nsfw on, and this run was scored without it: turn both on (and score "
            "again), or hygiene.nsfw off"
        )

    done = completed_shards(layout.store(SCORE), "score")
    store = layout.store(STAGE)
    result = StageResult(stage=STAGE, out=layout.stage_dir(STAGE), shards=len(done))
    saved = storage.join(layout.stage_dir(STAGE), HygieneConfig.file_name())
    if store.is_done(WHOLE_STAGE) and storage.exists(saved) and not _same_drops(saved, config):
        store.unmark_done(WHOLE_STAGE)  # other settings: the drops are computed again
    store.write_plan([WHOLE_STAGE])
    config.save(layout.stage_dir(STAGE))
    if not config.enabled:  # every part off: nothing dropped, recorded as such
        return _record_nothing_dropped(config, layout, done, result)

    def spec(_todo: list[list[ShardTask]]) -> dict:
        eval_uri = None
        if config.decontaminate and config.eval_folders:
            eval_uri = embed_eval_images(
                score_config, layout, eval_files(config.eval_folders), EVAL_SCHEMA
            )
        return {
            "embedding_files": [[s, layout.image_embeddings(s)] for s in done],
            "eval_file": eval_uri,
            "run_uri": layout.root,
            "config": {**config.to_dict(), "lsh_tables": config.lsh_tables()},
            "settings": config.settings(),
        }

    limit = config.local_max_images
    if limit and _pool_size(layout, done, limit) <= limit:  # 0: always Spark
        _run_local(layout, result, spec)
    else:
        run_spark_stage(
            JOB_SCRIPT,
            config.spark,
            STAGE,
            [(store, [ShardTask(WHOLE_STAGE)])],
            spec,
            result,
            layout.local_work_dir(),
            progress,
            whole=True,
        )
    st = store.read_done(WHOLE_STAGE)
    if st is None:
        err = store.read_all().get(WHOLE_STAGE, {}).get("error", "no marker")
        raise RuntimeError(f"hygiene job finished without a result: {err}")
    result.extra.update(skipped=not result.processed, drops=dict(st.drops), **(st.extra or {}))
    return result


def _same_drops(saved: str, config: HygieneConfig) -> bool:
    """Whether the saved config's settings decide the same drops as ``config``'s (where and
    how the job runs, Spark or one process, may differ: nothing is recomputed for that)."""
    from training.core.inputs import InputError

    try:
        return HygieneConfig.load(saved).settings() == config.settings()
    except (InputError, cfg.ConfigError, ValueError):  # another version's file: recompute
        return False


def _pool_size(layout: RunLayout, done, limit: float = float("inf")) -> int:
    """The scored images (from the embeddings files' footers), counted until past ``limit``."""
    import pyarrow.parquet as pq

    n = 0
    for s in done:
        if n > limit:
            break
        with storage.open_read(layout.image_embeddings(s)) as f:
            n += pq.ParquetFile(f).metadata.num_rows
    return n


def _run_local(layout: RunLayout, result: StageResult, spec) -> None:
    """The job in this process (``local``), with the Spark stage's lifecycle: a done marker
    whose outputs still match is kept, a failure is marked with its error and raised."""
    import time

    from training.core import tempfiles

    from ...runtime import markers
    from ...runtime.executor import collect_failures, pending_tasks
    from . import local

    store = layout.store(STAGE)
    todo = pending_tasks(store, [ShardTask(WHOLE_STAGE)], result)
    t0 = time.time()
    if todo:
        tempfiles.clean_temp(store.root)
        try:
            local.run(spec([todo]))
        except Exception as e:
            store.mark_failed(WHOLE_STAGE, f"hygiene failed: {e!r}", markers.ShardStats())
            raise
    result.processed = len(todo)
    result.seconds = round(time.time() - t0, 2)
    collect_failures(store, [WHOLE_STAGE], result)


def _record_nothing_dropped(config: HygieneConfig, layout: RunLayout, done, result):
    import time

    import pyarrow.parquet as pq

    from ...runtime import markers

    store = layout.store(STAGE)
    if store.is_done(WHOLE_STAGE):
        result.extra.update(skipped=True)
        return result
    t0 = time.time()
    n = _pool_size(layout, done)
    uri = layout.hygiene_dropped
    with storage.open_write(uri) as f:
        pq.write_table(pa.Table.from_pylist([], schema=DROPPED_SCHEMA), f)
    st = markers.ShardStats(n_in=n, n_out=n, started_at=t0, finished_at=time.time())
    st.extra = {"images_in": n, "images_kept": n, "settings": config.settings()}
    markers.record_outputs(st, store.root, [uri])
    store.mark_done(WHOLE_STAGE, st)
    result.processed = 1
    result.extra.update(skipped=False, drops={}, **st.extra)
    return result


def read_dropped(layout: RunLayout) -> pa.Table | None:
    """The dropped images of a run (None when the run has no hygiene stage)."""
    import pyarrow.parquet as pq

    uri = layout.hygiene_dropped
    if not storage.exists(uri):
        return None
    with storage.open_read(uri) as f:
        return pq.read_table(f)
