"""The I2E root's files: the contract between ``mofi write`` (which publishes them) and the
training loader (which reads them). Both ask this module for the names.

::

    I2E/{shard}.tar        WebDataset shard: KEY.jpg + KEY.json (entity ids, class indices, ...)
    I2E/{shard}.parquet    sidecar: one row per sample of the tar
    I2E/sizes.json         samples per tar, written after every shard is done
    I2E/vocab.parquet      entity_id, name, description, n_images, class_index
    I2E/_info.json         counts and provenance of the version
    I2E/_markers/write/    the write stage's done markers: each records its files' sizes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from . import storage
from .done_check import marker_uri, outputs_problem

SIZES_FILE = "sizes.json"
VOCAB_FILE = "vocab.parquet"
INFO_FILE = "_info.json"
WRITE_STAGE = "write"  # the stage that publishes an I2E root: its markers sit in it


@dataclasses.dataclass(frozen=True)
class I2ELayout:
    root: str

    @property
    def sizes(self) -> str:
        return storage.join(self.root, SIZES_FILE)

    @property
    def vocab(self) -> str:
        return storage.join(self.root, VOCAB_FILE)

    @property
    def info(self) -> str:
        return storage.join(self.root, INFO_FILE)

    def tar(self, shard: str) -> str:
        return storage.join(self.root, f"{shard}.tar")

    def sidecar(self, shard: str) -> str:
        return storage.join(self.root, f"{shard}.parquet")

    def marker(self, shard: str) -> str:
        """The write stage's done marker of ``shard`` (it records the published sizes)."""
        return marker_uri(self.root, WRITE_STAGE, shard, "done")

    def tar_problem(self, tar_name: str, sizes: Mapping[str, int]) -> str | None:
        """What is wrong with ``tar_name`` (size from ``sizes``, one listing) against the write
        marker that published it; None when it matches or no marker records it."""
        shard = tar_name[: -len(".tar")]
        try:
            outputs = storage.read_json(self.marker(shard))["stats"].get("outputs", {})
        except (FileNotFoundError, ValueError, KeyError):
            return None
        if tar_name not in outputs:
            return None
        return outputs_problem(
            self.root, {tar_name: outputs[tar_name]}, sizes, marker="write marker"
        )
