"""The image stream of scoring: raw tars -> uint8 image batches with their candidate entities.

Items are ``("batch", shard, keys, uint8 NCHW batch, candidates per key, sha256 per key)`` for
each batch of a shard (``"bytes"`` with the raw bytes instead of the batch for device decode), then ``("end", shard, stats)`` (or ``("fail", shard, error)``: the shard fails alone).
Only images with at least one linked candidate are decoded; bad images are counted skips.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset

from ...runtime import markers
from ...runtime import raw as raw_mod
from ..ner.stage import read_candidates

log = logging.getLogger(__name__)


def _spread_over_all_cores(worker_id: int) -> None:
    """Loader processes inherit the CPU affinity of the process that forked them; an OpenMP
    runtime that pinned the model's threads would otherwise squeeze every decoder onto the
    model's cores."""
    try:
        allowed = os.sched_getaffinity(0)
        every = set(range(os.cpu_count() or 1))
        if allowed != every:
            if worker_id == 0:
                log.warning(
                    "loader workers inherited CPU affinity %s; widening to all %d cores",
                    sorted(allowed),
                    len(every),
                )
            os.sched_setaffinity(0, every)
    except (AttributeError, OSError):
        pass


TAR_DROPS = {
    "unsafe_member_name",
    "non_file_member",
    "member_too_large",
    "tar_truncated",
    "tar_unreadable",
}


def merge_parts(parts: list[dict[str, Any]]) -> markers.ShardStats:
    """One shard's stats from the parts its loaders read (a loader reads every record
    ``i % parts == part``): counts and drops added; the candidates no part saw in the tar
    (and no tar-level drop explains) are ``image_missing_in_tar``, so that
    ``n_in = images scored + sum(drops)``."""
    st = markers.ShardStats()
    seen = 0
    for p in parts:
        one = markers.ShardStats.from_dict(p)
        st.n_in += one.n_in
        seen += int(one.extra.get("seen", 0))
        for reason, n in one.drops.items():
            st.drop(reason, n)
    tar_drops = sum(n for r, n in st.drops.items() if r in TAR_DROPS)
    missing = st.n_in - seen - tar_drops
    if missing > 0:
        st.drop("image_missing_in_tar", missing)
    return st


class ShardStream(IterableDataset):
    """Iterable over (kind, shard, ...) items: image batches per shard, then its end record.

    * ``("batch", shard, keys, uint8 NCHW batch, candidates per key)``: decoded with PIL;
      ``raw=True`` yields ``("bytes", shard, keys, [image bytes], candidates)`` instead, for
      a worker that decodes on its device;
    * ``("end", shard, stats, parts)``: this part of the shard is done (the worker publishes
      the shard when all ``parts`` have ended, see :func:`merge_parts`);
    * ``("fail", shard, error)``: the shard fails alone.

    In ``W`` loader processes every process reads every shard and takes the records
    ``i % W == w``, so a worker with a single shard still uses all its loaders (reading a tar
    is cheap next to decoding it). Iterated in the worker itself (``decode=threads``), the tar
    is read in order, each image is handed to one of ``decode_threads`` threads as it is read
    (PIL releases the GIL while it decodes and resizes), and ``phase_batches`` batches are
    decoded before the first is yielded: longer phases amortise the pool's ramp-up and the
    model's restart. Each shard's scores are sorted when published, so how records are split
    and interleaved never changes the output.
    """

    def __init__(
        self,
        shards: list[tuple[str, str, str]],
        image_size: int,
        batch_size: int,
        max_pixels: int,
        decode_threads: int = 1,
        phase_batches: int = 1,
        raw: bool = False,
        draft: bool = True,
    ):
        self.shards = shards  # (shard id, tar uri, mentions uri)
        self.image_size = image_size
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.decode_threads = decode_threads
        self.phase_batches = phase_batches  # batches decoded before the first of them is yielded
        self.raw = raw
        self.draft = draft

    def _decode(self, data: bytes | None):
        """(uint8 HWC array, None) or (None, drop reason). No torch here: a torch op in a
        decode thread would start an OpenMP team of its own."""
        from training.transforms import resize_center_crop, to_uint8_hwc

        im, reason = raw_mod.decode_image(
            data, self.max_pixels, draft_size=self.image_size if self.draft else None
        )
        if reason:
            return None, reason
        return to_uint8_hwc(resize_center_crop(im, self.image_size)), None

    def __iter__(self) -> Iterator[tuple]:
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
            _spread_over_all_cores(info.id)
        pool = None
        if self.decode_threads > 1 and not self.raw:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="mofi-decode")
        # with a pool, an image is decoded while the tar goes on being read
        if self.raw:
            decode = _kept  # bytes only: the worker decodes on its device
        else:
            decode = (lambda d: pool.submit(self._decode, d).result) if pool else self._decoded
        try:
            for sid, tar_uri, mentions_uri in self.shards:
                yield from self._shard(sid, tar_uri, mentions_uri, decode, part, parts)
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)

    def _decoded(self, data: bytes | None):
        out = self._decode(data)
        return lambda: out

    def _shard(self, sid, tar_uri, mentions_uri, decode, part: int, parts: int) -> Iterator[tuple]:
        from training.transforms import stack_hwc

        stats = markers.ShardStats()
        drop = markers.DropLogger(stats, log)
        try:
            cands = read_candidates(mentions_uri)
            stats.n_in = len(cands) if part == 0 else 0
            seen: set[str] = set()
            todo: list[tuple[str, Any]] = []  # (key, callable giving its decode result)
            keys: list[str] = []
            imgs: list[Any] = []
            digests: dict[str, str] = {}  # key -> sha256 of its bytes (the hygiene stage's)

            def decode_todo() -> None:
                for base, result in todo:
                    x, reason = result()
                    if reason:
                        drop(reason, f"{sid}/{base}")
                    else:
                        keys.append(base)
                        imgs.append(x)
                todo.clear()

            def batch(n: int) -> tuple:
                hashes = [digests.pop(k) for k in keys[:n]]
                if self.raw:
                    out = ("bytes", sid, keys[:n], imgs[:n], [cands[k] for k in keys[:n]])
                else:
                    x = stack_hwc(imgs[:n])  # channels-last NCHW, the CPU model's layout
                    out = ("batch", sid, keys[:n], x, [cands[k] for k in keys[:n]])
                del keys[:n], imgs[:n]
                return (*out, hashes)

            records = raw_mod.iter_tar_samples(
                tar_uri,
                drop if part == 0 else _ignore,  # every part reads the whole tar: count once
                wanted=raw_mod.IMAGE_EXTS,
            )
            for i, (key, group) in enumerate(records):
                if i % parts != part:
                    continue
                base = key.rsplit("/", 1)[-1]
                if base not in cands or base in seen:
                    continue
                seen.add(base)
                data = raw_mod.image_bytes(group)
                digests[base] = hashlib.sha256(data).hexdigest() if data else ""
                todo.append((base, decode(data)))
                if len(keys) + len(todo) == self.batch_size * self.phase_batches:
                    decode_todo()
                    while len(keys) >= self.batch_size:
                        yield batch(self.batch_size)
            decode_todo()
            while keys:
                yield batch(min(len(keys), self.batch_size))
            stats.extra["seen"] = len(seen)
            yield ("end", sid, stats.to_dict(), parts)
        except Exception as exc:  # the shard fails alone
            yield ("fail", sid, f"{type(exc).__name__}: {exc}")


def _kept(data: bytes | None):
    """Raw mode: the bytes themselves (an empty or missing image is still a counted drop)."""
    if not data:
        out = (None, "image_missing" if data is None else "image_empty")
    else:
        out = (data, None)
    return lambda: out


def _ignore(reason: str, detail: str = "") -> None:
    pass
