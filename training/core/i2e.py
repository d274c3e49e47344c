"""The I2E root's files: the contract between ``mofi write`` (which publishes them) and the
training loader (which reads them). Both ask this module for the names.

::

    I2E/{shard}.tar        WebDataset shard: KEY.jpg + KEY.json (entity ids, class indices, ...)
    I2E/{shard}.parquet    sidecar: one row per sample of the tar
    I2E/sizes.json         samples per tar, written after every shard is done
    I2E/vocab.parquet      entity_id, name, description, n_images, class_index
    I2E/_info.json         counts and provenance of the version
"""

from __future__ import annotations

import dataclasses

from . import storage

SIZES_FILE = "sizes.json"
VOCAB_FILE = "vocab.parquet"
INFO_FILE = "_info.json"


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
