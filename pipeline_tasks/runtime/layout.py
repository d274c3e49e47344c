"""Where every stage of an I2E build reads and writes: the one place that names the folders.

A consumer asks the layout for its producer's output instead of spelling the path::

    RUN/ner/{shard}.parquet                 mentions per raw shard            (ner)
    RUN/scorer/packaged.pt                  the bootstrapped packaged scorer  (scorer-bootstrap)
    RUN/score/{shard}.parquet               (key, entity_id, similarity)      (score)
    RUN/score/embeddings/{shard}.parquet    (key, visual features)            (score)
    RUN/score/_embedding_cache/FP/*.parquet entity text embeddings per scorer (FP: its weights)
    RUN/score/eval/{H}.parquet              evaluation images embedded by the scorer (hygiene)
    RUN/hygiene/dropped.parquet             images dropped before vocab, and why  (hygiene)
    RUN/vocab/vocab.parquet                 the entity vocabulary             (vocab)
    RUN/labels/{shard}.parquet              kept labels per raw shard         (vocab)
    RUN/_work/                              local scratch of this run (Spark and job files)
    I2E/...                                 see training.core.i2e             (write)

Every stage folder holds its markers under ``_markers/STAGE`` (see ``markers``). A build
version lives under ``ROOT/v=VERSION/`` with ``i2e_run`` and ``i2e`` in it (:class:`VersionLayout`).

:data:`STAGES` is the pipeline's one ordered list of stages: ``mofi build-i2e`` runs
:data:`BUILD_STAGES` in this order, the build DAG chains its tasks by it, and ``mofi status``
lists marker stores in its order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile

from training.core import storage
from training.core.i2e import VOCAB_FILE, WRITE_STAGE, I2ELayout

from .markers import MarkerStore

KB, NER, SCORE, HYGIENE, VOCAB, LABELS = "kb", "ner", "score", "hygiene", "vocab", "labels"
WRITE = WRITE_STAGE
# (stage, the marker stores it writes), in pipeline order; the knowledge base is the build's
# input, built once per KB version (``mofi kb``)
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (KB, (KB,)),
    (NER, (NER,)),
    (SCORE, (SCORE,)),
    (HYGIENE, (HYGIENE,)),
    (VOCAB, (VOCAB, LABELS)),
    (WRITE, (WRITE,)),
)
BUILD_STAGES = tuple(name for name, _ in STAGES if name != KB)
MARKER_STORES = tuple(store for _, stores in STAGES for store in stores)
RUN_DIR_NAME = "i2e_run"
WORK_DIR_NAME = "_work"
I2E_DIR_NAME = "i2e"
VERSION_PREFIX = "v="


def sibling(uri: str, name: str) -> str:
    """``name`` next to ``uri`` (same parent folder or S3 prefix)."""
    uri = str(uri).rstrip("/")
    if storage.is_s3(uri):
        return uri.rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(os.path.abspath(uri)), name)


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The work root of one I2E build (``--run``)."""

    root: str

    @classmethod
    def beside(cls, i2e_uri: str) -> RunLayout:
        """The default work root of a build writing ``i2e_uri``: ``I2E/../i2e_run``."""
        return cls(sibling(i2e_uri, RUN_DIR_NAME))

    def stage_dir(self, stage: str) -> str:
        return storage.join(self.root, stage)

    def store(self, stage: str) -> MarkerStore:
        return MarkerStore(self.stage_dir(stage), stage)

    def output(self, stage: str, shard: str) -> str:
        """The per-shard Parquet a stage publishes."""
        return storage.join(self.stage_dir(stage), f"{shard}.parquet")

    def image_embeddings(self, shard: str) -> str:
        """The visual features of each scored image of ``shard`` (the vocab stage's coherence:
        the scorer's image tower, or its embedding when it has no separate tower)."""
        return storage.join(self.stage_dir(SCORE), "embeddings", f"{shard}.parquet")

    @property
    def hygiene_dropped(self) -> str:
        return storage.join(self.stage_dir(HYGIENE), "dropped.parquet")

    @property
    def vocab_file(self) -> str:
        return storage.join(self.stage_dir(VOCAB), VOCAB_FILE)

    @property
    def scorer_checkpoint(self) -> str:
        return storage.join(self.root, "scorer", "packaged.pt")

    @property
    def embedding_cache(self) -> str:
        return storage.join(self.stage_dir(SCORE), "_embedding_cache")

    def local_work_dir(self) -> str:
        """Local scratch of this run (job specs, Spark's temp and logs, hand-off files): inside
        a local run root, or under the system temp folder for an s3:// run. Created on use."""
        if storage.is_s3(self.root):
            key = hashlib.sha1(self.root.encode()).hexdigest()[:12]
            path = os.path.join(tempfile.gettempdir(), "mofi-work", key)
        else:
            path = os.path.join(self.root, WORK_DIR_NAME)
        os.makedirs(path, exist_ok=True)
        return path


@dataclasses.dataclass(frozen=True)
class VersionLayout:
    """One dataset version: ``ROOT/v=VERSION/{i2e_run,i2e}`` (the build DAG's outputs)."""

    root: str

    @classmethod
    def of(cls, root: str, version: str) -> VersionLayout:
        if not version or "/" in version:
            raise ValueError(f"bad version name {version!r}")
        return cls(storage.join(str(root), f"{VERSION_PREFIX}{version}"))

    @property
    def run(self) -> RunLayout:
        return RunLayout(storage.join(self.root, RUN_DIR_NAME))

    @property
    def i2e(self) -> I2ELayout:
        return I2ELayout(storage.join(self.root, I2E_DIR_NAME))
