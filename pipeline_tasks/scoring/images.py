"""The image stream of scoring: raw tars -> uint8 image batches with their candidate entities.

Items are ``("batch", shard, keys, uint8 NCHW batch, candidates per key)`` for each batch of a
shard, then ``("end", shard, stats)`` (or ``("fail", shard, error)``: the shard fails alone).
Only images with at least one linked candidate are decoded; bad images are counted skips.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from .. import raw as raw_mod
from ..ner import read_candidates
from ..runtime import markers

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


class ShardStream(IterableDataset):
    """Iterable over (kind, shard, ...) items: uint8 image batches per shard, then its end record.

    In loader processes (``decode=processes``) each process takes whole shards
    (``shards[worker::workers]``), so reading a tar is sequential and decoding overlaps the
    model's compute in the parent. Iterated in the worker itself (``decode=threads``), the tar
    is read in order, each image is handed to one of ``decode_threads`` threads as it is read
    (PIL releases the GIL while it decodes and resizes), and ``phase_batches`` batches are
    decoded before the first is yielded: longer phases amortise the pool's ramp-up and the
    model's restart. Either way a shard's batches hold the same images in the same order.
    """

    def __init__(
        self,
        shards: list[tuple[str, str, str]],
        image_size: int,
        batch_size: int,
        max_pixels: int,
        decode_threads: int = 1,
        phase_batches: int = 1,
    ):
        self.shards = shards  # (shard id, tar uri, mentions uri)
        self.image_size = image_size
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.decode_threads = decode_threads
        self.phase_batches = phase_batches  # batches decoded before the first of them is yielded

    def _decode(self, data: bytes | None):
        """(uint8 HWC array, None) or (None, drop reason). No torch here: a torch op in a
        decode thread would start an OpenMP team of its own."""
        from training.transforms import resize_center_crop, to_uint8_hwc

        im, reason = raw_mod.decode_image(data, self.max_pixels, draft_size=self.image_size)
        if reason:
            return None, reason
        return to_uint8_hwc(resize_center_crop(im, self.image_size)), None

    def __iter__(self) -> Iterator[tuple]:
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        if info is not None:
            torch.set_num_threads(1)
            _spread_over_all_cores(info.id)
        pool = None
        if self.decode_threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="mofi-decode")
        # with a pool, an image is decoded while the tar goes on being read
        decode = (lambda d: pool.submit(self._decode, d).result) if pool else self._decoded
        try:
            for sid, tar_uri, mentions_uri in mine:
                yield from self._shard(sid, tar_uri, mentions_uri, decode)
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)

    def _decoded(self, data: bytes | None):
        out = self._decode(data)
        return lambda: out

    def _shard(self, sid: str, tar_uri: str, mentions_uri: str, decode) -> Iterator[tuple]:
        from training.transforms import stack_hwc

        stats = markers.ShardStats()
        drop = markers.DropLogger(stats, log)
        try:
            cands = read_candidates(mentions_uri)
            stats.n_in = len(cands)
            seen: set[str] = set()
            todo: list[tuple[str, Any]] = []  # (key, callable giving its decode result)
            keys: list[str] = []
            imgs: list[np.ndarray] = []

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
                x = stack_hwc(imgs[:n])  # channels-last NCHW, the CPU model's layout
                out = ("batch", sid, keys[:n], x, [cands[k] for k in keys[:n]])
                del keys[:n], imgs[:n]
                return out

            for key, group in raw_mod.iter_tar_samples(tar_uri, drop, wanted=raw_mod.IMAGE_EXTS):
                base = key.rsplit("/", 1)[-1]
                if base not in cands or base in seen:
                    continue
                seen.add(base)
                todo.append((base, decode(raw_mod.image_bytes(group))))
                if len(keys) + len(todo) == self.batch_size * self.phase_batches:
                    decode_todo()
                    while len(keys) >= self.batch_size:
                        yield batch(self.batch_size)
            decode_todo()
            while keys:
                yield batch(min(len(keys), self.batch_size))
            missing = len(set(cands) - seen) - sum(stats.drops.values())
            if missing > 0:
                stats.drop("image_missing_in_tar", missing)
            yield ("end", sid, stats.to_dict())
        except Exception as exc:  # the shard fails alone
            yield ("fail", sid, f"{type(exc).__name__}: {exc}")
