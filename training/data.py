"""I2E WebDataset loader for training: rank and worker split with no duplicates, exact resume.

The I2E root (written by ``mofi write``) holds ``NNNNN.tar`` shards (``KEY.jpg`` + ``KEY.json``),
``sizes.json`` (samples per tar), ``vocab.parquet`` and ``_info.json``. Tars are parsed with
webdataset's own tar iterators over our storage layer (local files or S3).

How samples are split, per epoch ``e`` (everything derives from ``(seed, e)``, never from
state, so a resumed run sees exactly what the uninterrupted run saw):

1. the shards are permuted with ``seed + e`` and dealt to ranks greedily (next shard to the
   rank with the fewest samples so far), using the counts in ``sizes.json``. A shard belongs
   to exactly one rank, so no sample is seen by two ranks;
2. inside a rank, DataLoader worker ``w`` of ``W`` keeps the samples ``i % W == w`` of the
   rank's stream (it reads the rank's tar bytes, and decodes only its own samples), shuffles
   them with a seeded buffer, and yields whole batches;
3. the DataLoader takes batch ``t`` from worker ``t % W``. Every rank makes the same number
   of steps: ``steps_per_epoch = W * min over (rank, worker) of full batches``, computed
   from ``sizes.json`` before any data is read; the remainder (under one batch per worker,
   plus the imbalance between ranks) waits for another epoch's permutation.

Resuming at step ``k`` of an epoch: worker ``w`` discards the batches ``t < k`` with
``t % W == w``. It decodes them again to discard them, so that a record that was unreadable
before the interruption is skipped the same way and the streams line up exactly (decoding is
a few percent of a training step, and only the resumed epoch's first steps pay it).

An image with several entities is labelled with one of them per step, drawn uniformly with
a seeded hash of (seed, epoch, key): CosFace is a single-label softmax, and over epochs every
entity of the image is used. An unreadable image or record is a counted skip; the worker
then fills its quota by wrapping around its own stream, so every rank still makes the same
number of steps (a DDP rank that runs short would hang the others).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

from .core import storage
from .core.config import ConfigError
from .core.i2e import VOCAB_FILE, I2ELayout
from .core.process import die_with_parent
from .transforms import as_rgb, resize_center_crop, to_uint8_tensor

log = logging.getLogger(__name__)
REBUILD = ": the I2E version is damaged; rebuild it with `mofi write` (intact shards are kept)"
Image.MAX_IMAGE_PIXELS = 64_000_000  # a decompression bomb is a counted skip, not an OOM


class DamagedShard(RuntimeError):
    """An I2E shard does not hold what the manifest says."""


@dataclasses.dataclass
class I2EManifest:
    """What training needs to know about an I2E version, read and checked before any compute."""

    uri: str
    shards: list[tuple[str, int]]  # (tar URI, samples)
    entity_ids: list[str]  # by class index
    names: list[str]
    descriptions: list[str]
    info: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.entity_ids)

    @property
    def num_samples(self) -> int:
        return sum(n for _, n in self.shards)

    def entity_texts(self) -> list[str]:
        """The contrastive text of each class: the entity name enriched with its description."""
        return [f"{n}, {d}" if d else n for n, d in zip(self.names, self.descriptions, strict=True)]

    def version(self) -> str:
        """A short content hash of the vocabulary and shard sizes (names an I2E version)."""
        h = hashlib.sha1(json.dumps([self.entity_ids, self.shards]).encode()).hexdigest()
        return h[:12]


def load_manifest(i2e_uri: str, verify: bool = False) -> I2EManifest:
    """The manifest of an I2E root, checked. ``verify``: also compare every tar's size with the
    one its write marker recorded (one small read per shard: done once, before training)."""
    if not i2e_uri:
        raise ConfigError("no I2E URI given (--i2e)")
    layout = I2ELayout(i2e_uri)
    sizes_uri, vocab_uri, info_uri = layout.sizes, layout.vocab, layout.info
    if not storage.exists(sizes_uri):
        raise ConfigError(
            f"{i2e_uri} is not an I2E root: {sizes_uri} is missing (build it with `mofi build-i2e`)"
        )
    if not storage.exists(vocab_uri):
        raise ConfigError(f"{i2e_uri} has no {VOCAB_FILE}")
    sizes = storage.read_json(sizes_uri)
    if not isinstance(sizes, dict) or not sizes:
        raise ConfigError(f"{sizes_uri} lists no shards: the I2E version is empty")
    tars = storage.list_sizes(i2e_uri, suffix=".tar")
    shards = []
    for name in sorted(sizes):
        uri = storage.join(i2e_uri, name)
        if uri not in tars:
            raise ConfigError(f"{sizes_uri} lists {name}, which is not in {i2e_uri}")
        problem = layout.tar_problem(name, tars) if verify else None
        if problem:
            raise ConfigError(f"I2E shard {uri}: {problem}" + REBUILD)
        n = sizes[name]
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"{sizes_uri}: {name} has an invalid size {n!r}")
        if n:
            shards.append((uri, n))
    if not shards:
        raise ConfigError(f"{sizes_uri}: every shard is empty")
    with storage.open_read(vocab_uri) as f:
        vocab = pq.read_table(f).to_pylist()
    if not vocab:
        raise ConfigError(f"{vocab_uri} is empty")
    vocab.sort(key=lambda r: r["class_index"])
    idx = [r["class_index"] for r in vocab]
    if idx != list(range(len(vocab))):
        raise ConfigError(f"{vocab_uri}: class indices are not 0..{len(vocab) - 1}")
    info = storage.read_json(info_uri) if storage.exists(info_uri) else {}
    if info.get("num_classes", len(vocab)) != len(vocab):
        raise ConfigError(
            f"vocabulary and shards disagree: {vocab_uri} has {len(vocab)} classes, "
            f"{info_uri} says the shards were written with {info['num_classes']}"
        )
    if info.get("num_samples", sum(n for _, n in shards)) != sum(n for _, n in shards):
        raise ConfigError(
            f"{sizes_uri} counts {sum(n for _, n in shards)} samples, {info_uri} says {info['num_samples']}"
        )
    return I2EManifest(
        uri=i2e_uri,
        shards=shards,
        entity_ids=[r["entity_id"] for r in vocab],
        names=[r["name"] for r in vocab],
        descriptions=[r.get("description") or "" for r in vocab],
        info=info,
    )


# ------------------------------------------------------------------ the split


def assign_shards(
    shards: list[tuple[str, int]], world_size: int, seed: int, epoch: int
) -> list[list[tuple[str, int]]]:
    """Shards per rank for one epoch: seeded permutation, dealt greedily by sample count."""
    if len(shards) < world_size:
        raise ConfigError(
            f"the I2E version has {len(shards)} shards, fewer than the {world_size} ranks: "
            "reshard it (`mofi write --shard-size N`) or train on fewer processes"
        )
    order = list(shards)
    random.Random(f"{seed}:{epoch}:shards").shuffle(order)
    per_rank: list[list[tuple[str, int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for shard in order:
        r = min(range(world_size), key=lambda i: (load[i], i))
        per_rank[r].append(shard)
        load[r] += shard[1]
    return per_rank


def worker_share(n: int, worker: int, num_workers: int) -> int:
    """Samples ``i < n`` with ``i % num_workers == worker``."""
    return max(0, (n - worker + num_workers - 1) // num_workers)


def steps_per_epoch(
    shards: list[tuple[str, int]],
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
) -> int:
    """Steps every rank makes in this epoch (the same on all ranks)."""
    w = max(1, num_workers)
    per_rank = assign_shards(shards, world_size, seed, epoch)
    fewest = min(
        worker_share(sum(n for _, n in rs), i, w) // batch_size for rs in per_rank for i in range(w)
    )
    return w * fewest


def batches_before(step: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` made before global step ``step`` (round robin)."""
    return worker_share(step, worker, num_workers)


# ------------------------------------------------------------------ decoding


def sample_seed(seed: int, epoch: int, key: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest(), "little"
    )


def decode_train_image(data: bytes, size: int, flip: bool) -> torch.Tensor:
    """Shorter side to ``size``, centre crop, optional horizontal flip; uint8 CHW."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (size, size))  # JPEG DCT scaling: decode big images at a fraction of the cost
    im = resize_center_crop(as_rgb(im), size, Image.BILINEAR)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return to_uint8_tensor(im)


def read_tar_samples(uri: str) -> Iterator[dict[str, Any]]:
    """Raw samples ({__key__, jpg, json} bytes) of one I2E tar, via webdataset's tar iterators."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with storage.open_read(uri) as f:
        files = ({**member, "__url__": uri} for member in tar_file_iterator(f))
        yield from group_by_keys(files)


@dataclasses.dataclass
class LoaderSpec:
    """Everything a loader worker needs (picklable)."""

    shards: list[tuple[str, int]]
    world_size: int
    rank: int
    batch_size: int
    image_size: int
    seed: int
    epoch: int
    steps: int  # steps in this epoch (all ranks)
    start_step: int = 0  # resume inside the epoch
    num_workers: int = 1
    shuffle_buffer: int = 1000
    flip: bool = True


class I2EBatches(torch.utils.data.IterableDataset):
    """Yields whole batches: {"image": uint8 (B,3,S,S), "label": (B,), "key": [str], "step": int}."""

    def __init__(self, spec: LoaderSpec):
        super().__init__()
        self.spec = spec
        self.drops: Counter[str] = Counter()

    def _raw_stream(self, worker: int) -> Iterator[dict[str, Any]]:
        sp = self.spec
        mine = assign_shards(sp.shards, sp.world_size, sp.seed, sp.epoch)[sp.rank]
        w = max(1, sp.num_workers)
        i = 0
        for uri, expected in mine:
            seen = 0
            try:
                for sample in read_tar_samples(uri):
                    seen += 1
                    if i % w == worker:
                        yield sample
                    i += 1
            except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
                raise DamagedShard(f"I2E shard {uri} is unreadable: {exc}{REBUILD}") from exc
            if seen != expected:  # never pad a damaged version by repeating other samples
                raise DamagedShard(
                    f"I2E shard {uri} holds {seen} samples, sizes.json says {expected}{REBUILD}"
                )

    def _shuffled(self, worker: int) -> Iterator[dict[str, Any]]:
        sp = self.spec
        rng = random.Random(f"{sp.seed}:{sp.epoch}:{sp.rank}:{worker}:buffer")
        buf: list[dict[str, Any]] = []
        for sample in self._raw_stream(worker):
            buf.append(sample)
            if len(buf) >= sp.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int, str] | None:
        sp = self.spec
        key = sample.get("__key__", "?")
        data, meta = sample.get("jpg"), sample.get("json")
        if data is None or meta is None:
            self.drops["missing_member"] += 1
            return None
        try:
            labels = json.loads(meta)["class_indices"]
        except (ValueError, KeyError, TypeError):
            self.drops["bad_json"] += 1
            return None
        if not labels:
            self.drops["no_label"] += 1
            return None
        rng = random.Random(sample_seed(sp.seed, sp.epoch, key))
        label = int(labels[rng.randrange(len(labels))])
        try:
            image = decode_train_image(data, sp.image_size, sp.flip and rng.random() < 0.5)
        except Exception as exc:  # PIL raises many kinds for corrupt data
            self.drops[f"bad_image:{type(exc).__name__}"] += 1
            if sum(self.drops.values()) <= 10:
                log.warning("skipping %s: %s", key, exc)
            return None
        return image, label, key

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sp = self.spec
        info = torch.utils.data.get_worker_info()
        worker, w = (info.id, info.num_workers) if info else (0, 1)
        if w != max(1, sp.num_workers):
            raise RuntimeError(f"loader planned for {sp.num_workers} workers, runs with {w}")
        # The DataLoader takes its first batch from process 0: after resuming at step k, process
        # i plays the worker that owns step k + i, so batches still arrive in step order.
        worker = (worker + sp.start_step) % w
        quota = batches_before(sp.steps, worker, w)
        skip = batches_before(sp.start_step, worker, w)
        made = 0
        to_skip = skip * sp.batch_size
        passes = 0
        batch: list[tuple[torch.Tensor, int, str]] = []
        while made < quota - skip:
            got_any = False
            for sample in self._shuffled(worker):
                got_any = True
                item = self._decode(sample)
                if item is None:
                    continue
                if to_skip > 0:  # resume: consumed before the interruption
                    to_skip -= 1
                    continue
                batch.append(item)
                if len(batch) == sp.batch_size:
                    made += 1
                    yield self._collate(batch, skip + made - 1, worker, w)
                    batch = []
                    if made >= quota - skip:
                        return
            passes += 1
            if not got_any or passes > 3:
                raise RuntimeError(
                    f"rank {sp.rank} worker {worker}: too few readable samples for "
                    f"{quota} batches ({dict(self.drops)})"
                )
            log.warning(
                "rank %d worker %d wraps around its stream to fill its quota (%s)",
                sp.rank,
                worker,
                dict(self.drops),
            )

    @staticmethod
    def _collate(batch, local_index: int, worker: int, w: int) -> dict[str, Any]:
        return {
            "image": torch.stack([b[0] for b in batch]),
            "label": torch.tensor([b[1] for b in batch], dtype=torch.long),
            "key": [b[2] for b in batch],
            "step": local_index * w + worker,  # the global step this batch is for
        }


def _init_loader_worker(_worker_id: int) -> None:
    die_with_parent()  # a loader never outlives its rank
    # Decoding is a few percent of a training step's CPU time: where cores are scarce, the
    # trainer's compute threads should win every contention with a loader worker.
    try:
        os.nice(5)
    except OSError:
        pass


def make_loader(spec: LoaderSpec, start_method: str = "fork") -> torch.utils.data.DataLoader:
    ds = I2EBatches(spec)
    kwargs: dict[str, Any] = {}
    if spec.num_workers > 0:
        kwargs = {
            "multiprocessing_context": start_method,
            "prefetch_factor": 2,
            "persistent_workers": False,
            "worker_init_fn": _init_loader_worker,
        }
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=spec.num_workers, pin_memory=False, **kwargs
    )
