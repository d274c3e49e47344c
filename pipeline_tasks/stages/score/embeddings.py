"""Entity text embeddings: each distinct entity embedded once per scorer, ever.

The cache lives on storage (``RUN/score/_embedding_cache/FINGERPRINT/part-*.parquet`` by
default), keyed by the scorer's fingerprint and a hash of the entity's prompt texts, so a
rebuild with the same scorer and the same KB texts embeds nothing again, and a changed
description is embedded anew.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.core import storage

from .backends import ScorerBackend
from .config import ScoreConfig
from .prompts import entity_texts


def embed_entities(
    make_backend: Callable[[], ScorerBackend],
    fingerprint: str,
    kb_rows: dict[str, dict[str, Any]],
    eids: list[str],
    c: ScoreConfig,
    cache_root: str,
) -> tuple[np.ndarray, int]:
    """(matrix aligned with eids, number of entities embedded now). The scorer is built only
    when some entity is missing from the cache (``fingerprint`` names its weights)."""
    import torch

    texts = entity_texts(kb_rows, eids, c.prompts)
    tkey = [hashlib.sha1("\x1f".join(t).encode()).hexdigest()[:16] for t in texts]
    cache_dir = storage.join(cache_root, fingerprint)
    cached = _read_cached(cache_dir, set(tkey))
    todo = sorted({k: i for i, k in enumerate(tkey) if k not in cached}.items())
    new_rows = []
    backend = make_backend() if todo else None
    step = max(1, c.text_batch_size // len(c.prompts))
    for s in range(0, len(todo), step):
        chunk = todo[s : s + step]
        flat = [p for _, i in chunk for p in texts[i]]
        emb = backend.encode_texts(flat, pad_to=step * len(c.prompts))
        emb = emb.view(len(chunk), len(c.prompts), -1).mean(dim=1)
        emb = torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32)
        for (k, _), e in zip(chunk, emb, strict=True):
            cached[k] = e
            new_rows.append((k, e))
    if new_rows:
        name = hashlib.sha1("".join(k for k, _ in new_rows).encode()).hexdigest()[:16]
        table = pa.table(
            {"text_key": [k for k, _ in new_rows], "embedding": [e.tolist() for _, e in new_rows]}
        )
        with storage.open_write(storage.join(cache_dir, f"part-{name}.parquet")) as f:
            pq.write_table(table, f)
    dim = len(next(iter(cached.values()))) if cached else 1
    mat = np.stack([cached[k] for k in tkey]) if tkey else np.zeros((0, dim), np.float32)
    return mat, len(new_rows)


def _read_cached(cache_dir: str, need: set[str]) -> dict[str, np.ndarray]:
    """text key -> embedding of the cached entries among ``need``, read a batch at a time and
    filtered in Arrow (a cache of millions of entities is never held whole)."""
    import pyarrow.compute as pc

    cached: dict[str, np.ndarray] = {}
    if not need:
        return cached
    want = pa.array(sorted(need), pa.string())
    for uri in storage.list_files(cache_dir, suffix=".parquet"):
        with storage.open_read(uri) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536):
                batch = batch.filter(pc.is_in(batch.column("text_key"), value_set=want))
                if not batch.num_rows:
                    continue
                embs = batch.column("embedding").to_numpy(zero_copy_only=False)
                for k, e in zip(batch.column("text_key").to_pylist(), embs, strict=True):
                    cached[k] = np.asarray(e, dtype=np.float32)
    return cached


def write_entity_matrix(path: str, eids: list[str], mat: np.ndarray) -> list[str]:
    """The matrix the image workers of this call map (local files ``path.npy`` and
    ``path.ids.parquet``); returns the files written."""
    np.save(f"{path}.npy", np.ascontiguousarray(mat, dtype=np.float32))
    pq.write_table(pa.table({"entity_id": pa.array(eids, pa.string())}), f"{path}.ids.parquet")
    return [f"{path}.npy", f"{path}.ids.parquet"]


def read_entity_matrix(path: str) -> tuple[dict[str, int], np.ndarray]:
    """(entity_id -> row, float32 matrix) of :func:`write_entity_matrix`'s files. The matrix
    is memory-mapped copy-on-write: the workers of a host share its pages."""
    ids = pq.read_table(f"{path}.ids.parquet").column("entity_id").to_pylist()
    mat = np.load(f"{path}.npy", mmap_mode="c")
    return {e: i for i, e in enumerate(ids)}, mat
