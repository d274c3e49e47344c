"""Evaluation images embedded by the run's scorer, as the score stage embeds the pool: the
same decode, resize and crop, the same visual features (``encode_images(with_visual=True)``),
and the same perceptual hash (``phash``), so the hygiene stage can compare pool and
evaluation images in one space.

Saved once per (scorer, list of files with their sizes) under ``RUN/score/eval/``; a file
that cannot be decoded is a counted skip (logged), not a crash.
"""

from __future__ import annotations

import hashlib
import logging

from training.core import storage

from ...runtime import raw as raw_mod
from ...runtime.layout import RunLayout
from .backends import backend_fingerprint, build_backend
from .phash import phash
from .worker import resolve_devices

log = logging.getLogger(__name__)


def eval_embeddings_uri(c, layout: RunLayout, files: list[str]) -> str:
    h = hashlib.sha256(f"v2\0{backend_fingerprint(c, layout.root)}".encode())  # v2: phash
    for f in files:
        h.update(f"{f}\0{storage.size(f)}\0".encode())
    return storage.join(layout.stage_dir("score"), "eval", f"{h.hexdigest()[:20]}.parquet")


def embed_eval_images(c, layout: RunLayout, files: list[str], schema) -> str:
    """The URI of the embeddings (file, embedding, sha256, phash) of ``files``; computed
    when missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from training.transforms import resize_center_crop, stack_hwc, to_uint8_hwc

    uri = eval_embeddings_uri(c, layout, files)
    if storage.exists(uri):
        return uri
    device = torch.device(resolve_devices(c.devices)[0])
    backend = build_backend(c, layout.root, device)
    names, embs, hashes, copy_hashes, skipped = [], [], [], [], 0
    batch: list = []

    def flush() -> None:
        if batch:
            x = stack_hwc([b[1] for b in batch])
            _, v = backend.encode_images(x, with_visual=True)
            copy_hashes.extend(phash(x).tolist())
            for (name, _, digest), e in zip(batch, v.numpy(), strict=True):
                names.append(name)
                embs.append(e.astype("float32").tolist())
                hashes.append(digest)
            batch.clear()

    for f in files:
        data = storage.read_bytes(f)
        im, reason = raw_mod.decode_image(data, c.max_pixels)
        if reason:
            skipped += 1
            log.warning("eval image %s skipped: %s", f, reason)
            continue
        hwc = to_uint8_hwc(resize_center_crop(im, backend.image_size))
        batch.append((f, hwc, hashlib.sha256(data).hexdigest()))
        if len(batch) == c.batch_size:
            flush()
    flush()
    if not names:
        raise ValueError(f"none of the {len(files)} evaluation images could be decoded")
    table = pa.table(
        {"file": names, "embedding": embs, "sha256": hashes, "phash": copy_hashes}, schema=schema
    )
    with storage.open_write(uri) as out:
        pq.write_table(table, out)
    log.info("embedded %d evaluation images (%d skipped) into %s", len(names), skipped, uri)
    return uri
