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

    def marker(self, shard: str) -> str:
        """The write stage's done marker of ``shard`` (it records the published sizes)."""
        return storage.join(self.root, "_markers", "write", f"{shard}.done.json")

    def recorded_size(self, tar_name: str) -> int | None:
        """The size the write marker recorded for ``tar_name`` (None: no record to check)."""
        shard = tar_name[: -len(".tar")]
        try:
            outputs = storage.read_json(self.marker(shard))["stats"].get("outputs", {})
        except (FileNotFoundError, ValueError, KeyError):
            return None
        return outputs.get(tar_name, {}).get("size")
