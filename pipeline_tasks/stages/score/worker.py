"""The scoring worker: one process per device, streaming its share of the shards.

``setup`` loads the scorer and the entity matrix once; ``process_all`` runs the image
stream (decode in loader processes or in threads, see ``ScoreConfig.decode``), embeds each
batch under autocast, takes the dot product of every (image, candidate) pair in one gather,
and publishes ``SCORE/{shard}.parquet`` (key, entity_id, similarity) then the shard's done
marker. Every forward pass has the same shape (a shard's last batch is padded), so the
heap is reused exactly and memory stays flat.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from training.core import storage

from ...runtime import markers
from ...runtime.executor import ShardOutcome, ShardStage, ShardTask
from ...runtime.layout import SCORE, RunLayout
from .backends import build_backend, reference_batch
from .config import ScoreConfig
from .device_decode import DeviceDecoder
from .embeddings import read_entity_matrix
from .images import ShardStream, merge_parts
from .phash import phash

log = logging.getLogger(__name__)
SCORE_SCHEMA = pa.schema(
    [("key", pa.string()), ("entity_id", pa.string()), ("similarity", pa.float32())]
)
EMBEDDING_TYPE = pa.list_(pa.float32())  # each scored image's visual features (coherence)


def resolve_devices(spec: str) -> list[str]:
    import torch

    if spec == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    return [d.strip() for d in spec.split(",") if d.strip()]


def decode_plan(c: ScoreConfig, device, model_threads: int, world: int) -> tuple[str, int]:
    """(``threads``, ``processes`` or ``device``, how many) for one worker on ``device``."""
    mode = c.decode if c.decode != "auto" else ("threads" if device.type == "cpu" else "device")
    if c.loader_workers:
        return mode, c.loader_workers
    if mode == "threads":
        return mode, model_threads
    if mode == "device":  # the loaders only read tar members: two keep a GPU fed
        return mode, 2
    share = max(1, (os.cpu_count() or 1) // max(1, world))
    return mode, max(1, share - (model_threads if device.type == "cpu" else 1))


@dataclasses.dataclass
class _Loop:
    """What one worker's scoring loop accumulates over its shards."""

    ref_x: Any = None  # the preloaded batch the bare forward is timed on
    parts: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    device_drops: dict[str, Counter] = dataclasses.field(default_factory=dict)
    failed: set[str] = dataclasses.field(default_factory=set)
    buffers: dict[str, list[tuple[str, str, float]]] = dataclasses.field(default_factory=dict)
    # shard -> (key, visual features, sha256, NSFW score, pHash)
    embeddings: dict[str, list[tuple[str, Any]]] = dataclasses.field(default_factory=dict)
    started: dict[str, float] = dataclasses.field(default_factory=dict)
    t_decode: float = 0.0
    t_first_scored: float | None = None
    t_img: float = 0.0
    n_img: int = 0
    t_ref: float = 0.0
    t_nsfw: float = 0.0
    t_phash: float = 0.0
    n_ref: int = 0
    n_batches: int = 0
    t_first: float | None = None
    # blocked on the loader: the data path is the bottleneck when this dominates
    t_wait: float = 0.0


@dataclasses.dataclass
class ScoreStage(ShardStage):
    """Scores shards on ``devices[rank]``; picklable, so it runs in spawned workers."""

    config: ScoreConfig
    run_uri: str
    entity_matrix: str
    devices: list[str]
    reference_every: int = 0

    name = "score"
    unit = "shard"
    streams_shards = True
    # Workers are always fresh processes, also for one device: they inherit nothing of the
    # driver's text phase (text tower, KB), so their memory is the image loop's alone.
    isolated = True

    def setup(self, worker: int, workers: int) -> None:
        import torch

        from training.core.device import pick_device, tune_heap

        c = self.config
        self._t_setup = time.time()  # spawned and imported: where start-up time goes
        tune_heap(c.heap_mmap_threshold_mb << 20, c.heap_trim_threshold_mb << 20)
        self.rank, self.world = worker, workers
        self.device = pick_device(self.devices[worker])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # On CPU the model needs every core; on a GPU the cores belong to the decode processes.
        self.threads = c.torch_threads or (
            (os.cpu_count() or 1) if self.device.type == "cpu" else 2
        )
        torch.set_num_threads(self.threads)
        self.backend = build_backend(c, self.run_uri, self.device)
        self.nsfw = None
        if c.nsfw:  # Open NSFW on the same batches (the hygiene stage filters by its score)
            from .nsfw import NsfwScorer

            self.nsfw = NsfwScorer(self.device.type, self.threads)
        self.index, mat = read_entity_matrix(self.entity_matrix)
        self.E = torch.from_numpy(mat).to(self.device)  # on CPU: the shared mapping itself
        self._t_ready = time.time()
        self._report: dict[str, Any] = {}

    def _loader(self, tasks: list[ShardTask]):
        from torch.utils.data import DataLoader

        c = self.config
        mine = [(t.shard, t.data["tar"], t.data["mentions"]) for t in tasks]
        mode, n_decode = decode_plan(c, self.device, self.threads, self.world)
        if mode == "threads":
            # Decode and forward take turns on the same cores: a decoder running beside the
            # model would hold a core that one of the model's threads waits for at every op.
            phase = max(1, -(-c.decode_phase_images // c.batch_size))
            stream = ShardStream(
                mine,
                self.backend.image_size,
                c.batch_size,
                c.max_pixels,
                n_decode,
                phase_batches=phase,
                draft=c.jpeg_draft,
            )
            return DataLoader(stream, batch_size=None, num_workers=0), f"{n_decode} {mode}"
        # every loader reads every shard and takes its share of the records, so a worker
        # with a single shard still uses all its loaders
        stream = ShardStream(
            mine,
            self.backend.image_size,
            c.batch_size,
            c.max_pixels,
            raw=mode == "device",
            draft=c.jpeg_draft,
        )
        # batches in flight (decoded ones pass through /dev/shm): 8, or 2 per loader process
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=n_decode,
            prefetch_factor=max(2, 8 // n_decode),
            in_order=False,  # a slow loader never holds up the others' batches
        )
        return loader, f"{n_decode} {mode}"

    def process_all(
        self, tasks: Iterable[ShardTask], store: markers.MarkerStore
    ) -> Iterator[ShardOutcome]:
        c = self.config
        mine = []
        for t in tasks:
            try:
                store.claim(t.shard)
                mine.append(t)
            except markers.ShardBusy as exc:  # another run has it
                yield ShardOutcome(t.shard, 0, busy=str(exc))
        if not mine:
            return
        loader, decode = self._loader(mine)
        decoder = (
            DeviceDecoder(self.device, self.backend.image_size, c.max_pixels)
            if decode.endswith("device")
            else None
        )
        # the bare forward, interleaved with the real batches, so both see the same machine
        st = _Loop(reference_batch(self.backend, c.batch_size) if self.reference_every else None)
        t_loop = time.perf_counter()
        it = iter(loader)
        while True:
            t_w = time.perf_counter()
            item = next(it, None)
            if item is None:
                break
            st.t_wait += time.perf_counter() - t_w if st.t_first else 0.0
            st.t_first = st.t_first or time.perf_counter()
            kind, sid = item[0], item[1]
            if sid not in st.started:
                st.started[sid] = time.time()
            if sid in st.failed:  # the rest of a shard that already failed (another part's)
                continue
            if kind == "bytes":  # decode on the device; a bad record is a counted drop
                batch = self._decode_on_device(item, decoder, st)
                if batch is not None:
                    self._score_batch(sid, *batch, st)
            elif kind == "batch":
                self._score_batch(sid, item[2], item[3], item[4], item[5], st)
            elif kind == "end":  # one part of the shard is done; publish when all are
                outcome = self._end_part(sid, item[2], item[3], st, store)
                if outcome is not None:
                    yield outcome
            else:  # fail
                yield self._fail(sid, item[2], st, store)
        self._report = self._worker_report(st, t_loop, decode, decoder)

    def _decode_on_device(self, item, decoder, st: _Loop):
        """(keys, uint8 batch, candidates) of a batch of raw bytes decoded on the device, the
        records it rejects counted as drops of their shard; None when none is left."""
        _, sid, keys, datas, cand, hashes = item
        t0 = time.perf_counter()
        x, kept, bad = decoder(datas)
        for i, reason in bad.items():
            st.device_drops.setdefault(sid, Counter())[reason] += 1
            log.debug("skip [%s] %s/%s", reason, sid, keys[i])
        st.t_decode += time.perf_counter() - t0
        if x is None:
            return None
        return [keys[i] for i in kept], x, [cand[i] for i in kept], [hashes[i] for i in kept]

    def _score_batch(self, sid: str, keys, x, cand, hashes, st: _Loop) -> None:
        """Embed one batch (padded to the fixed shape) and take the similarity of every
        (image, candidate) pair in one gathered dot product."""
        import torch

        c, backend = self.config, self.backend
        t0 = time.perf_counter()
        n_real = x.shape[0]
        if n_real < c.batch_size:  # a shard's last batch: pad to the fixed shape
            x = torch.cat([x, x.new_zeros((c.batch_size - n_real, *x.shape[1:]))])
        feats, visual = backend.encode_images(x, on_device=True, with_visual=True)
        feats, visual = feats[:n_real], visual[:n_real]
        img_rows = [i for i, cs in enumerate(cand) for _ in cs]
        ent_rows = [self.index[e] for cs in cand for e in cs]
        sims = (feats[img_rows] * self.E[ent_rows]).sum(-1).tolist()
        st.t_img += time.perf_counter() - t0
        if not st.n_img:
            st.t_first_scored = time.time()
        st.n_img += len(keys)
        pairs = [(keys[i], e) for i, cs in enumerate(cand) for e in cs]
        st.buffers.setdefault(sid, []).extend(
            (k, e, float(v)) for (k, e), v in zip(pairs, sims, strict=True)
        )
        if self.nsfw is not None:
            t0 = time.perf_counter()
            unsafe = self.nsfw(x[:n_real]).tolist()
            st.t_nsfw += time.perf_counter() - t0
        else:
            unsafe = [None] * n_real
        t0 = time.perf_counter()
        copy_hash = phash(x[:n_real]).tolist()  # the hygiene stage's copy descriptor
        st.t_phash += time.perf_counter() - t0
        st.embeddings.setdefault(sid, []).extend(
            zip(keys, visual.cpu().numpy(), hashes, unsafe, copy_hash, strict=True)
        )
        st.n_batches += 1
        if self.reference_every and st.n_batches % self.reference_every == 0:
            t0 = time.perf_counter()
            backend.encode_images(st.ref_x, on_device=True).sum().item()  # .item(): synced
            st.t_ref += time.perf_counter() - t0
            st.n_ref += c.batch_size

    def _end_part(self, sid, part_stats, n_parts, st: _Loop, store) -> ShardOutcome | None:
        """One loader's part of a shard ended; the shard is published once all have."""
        st.parts.setdefault(sid, []).append(part_stats)
        if len(st.parts[sid]) < n_parts:
            return None
        stats = merge_parts(st.parts.pop(sid))
        for reason, n in st.device_drops.pop(sid, Counter()).items():
            stats.drop(reason, n)
        self._publish(
            sid,
            sorted(st.buffers.pop(sid, [])),
            sorted(st.embeddings.pop(sid, []), key=lambda r: r[0]),
            stats,
            st.started[sid],
            store,
        )
        return ShardOutcome(sid, 1)

    def _fail(self, sid: str, error: str, st: _Loop, store) -> ShardOutcome:
        st.failed.add(sid)
        st.buffers.pop(sid, None)
        st.embeddings.pop(sid, None)
        st.parts.pop(sid, None)
        store.mark_failed(
            sid, error, markers.ShardStats(started_at=st.started[sid], finished_at=time.time())
        )
        return ShardOutcome(sid, 1, error)

    def _worker_report(self, st: _Loop, t_loop: float, decode: str, decoder) -> dict[str, Any]:
        from training.core.device import peak_rss_bytes

        return {
            "rank": self.rank,
            "device": str(self.device),
            "peak_rss_bytes": peak_rss_bytes(),
            "images": st.n_img,
            "model_s": st.t_img,
            "loop_s": time.perf_counter() - t_loop,
            "steady_s": time.perf_counter() - (st.t_first or time.perf_counter()) - st.t_ref,
            "wait_s": st.t_wait,
            "reference_s": st.t_ref,
            "nsfw_s": st.t_nsfw,
            "phash_s": st.t_phash,
            "reference_images": st.n_ref,
            "decode": decode,
            "device_decode_s": st.t_decode,
            "decoded_on_device": decoder.decoded_on_device if decoder else 0,
            "device_fallbacks": decoder.fallbacks if decoder else 0,
            "t_setup": self._t_setup,
            "t_ready": self._t_ready,
            "t_first_scored": st.t_first_scored,
        }

    def _publish(self, sid, rows, embs, st: markers.ShardStats, started_at: float, store) -> None:
        layout = RunLayout(self.run_uri)
        uri = layout.output(SCORE, sid)
        emb_uri = layout.image_embeddings(sid)
        with storage.open_write(emb_uri) as f:
            pq.write_table(
                pa.table(
                    {
                        "key": [r[0] for r in embs],
                        "embedding": pa.array([r[1].tolist() for r in embs], EMBEDDING_TYPE),
                        "sha256": pa.array([r[2] or None for r in embs], pa.string()),
                        "nsfw": pa.array([r[3] for r in embs], pa.float32()),
                        "phash": pa.array([r[4] for r in embs], pa.int64()),
                    }
                ),
                f,
                compression="zstd",
            )
        table = pa.table(
            {
                "key": [r[0] for r in rows],
                "entity_id": [r[1] for r in rows],
                "similarity": pa.array([r[2] for r in rows], pa.float32()),
            },
            schema=SCORE_SCHEMA,
        )
        with storage.open_write(uri) as f:
            pq.write_table(table, f, compression="zstd")
        st.n_out = len({r[0] for r in rows})
        markers.record_outputs(st, store.root, [uri, emb_uri])
        st.started_at = started_at
        st.finished_at = time.time()
        st.duration_s = round(st.finished_at - st.started_at, 3)
        st.extra = {"pairs": len(rows), "device": str(self.device)}
        st.host = os.uname().nodename
        store.mark_done(sid, st)

    def report(self) -> dict[str, Any]:
        return self._report

    def summarize(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        reports = sorted((r for r in reports if r), key=lambda r: r["rank"])
        if not reports:
            return {}
        n_img = sum(r["images"] for r in reports)
        out = {
            "images": n_img,
            # from the first decoded batch to the last result, per worker, summed over workers
            "images_per_s_steady": round(
                sum(r["images"] / r["steady_s"] for r in reports if r.get("steady_s")), 1
            ),
            "model_seconds": round(sum(r["model_s"] for r in reports), 2),
            "nsfw_seconds": round(sum(r.get("nsfw_s", 0.0) for r in reports), 2),
            "phash_seconds": round(sum(r.get("phash_s", 0.0) for r in reports), 2),
            "worker_peak_rss_bytes": max(r["peak_rss_bytes"] for r in reports),
            "loader_wait_seconds": round(sum(r["wait_s"] for r in reports), 2),
            "devices": [r["device"] for r in reports],
            "decode": sorted({r["decode"] for r in reports}),
            "decoded_on_device": sum(r.get("decoded_on_device", 0) for r in reports),
            "device_fallbacks": sum(r.get("device_fallbacks", 0) for r in reports),
            # absolute times (the driver makes them relative to its launch)
            "t_setup": min(r["t_setup"] for r in reports),
            "t_ready": max(r["t_ready"] for r in reports),
            "t_first_scored": min(
                (r["t_first_scored"] for r in reports if r["t_first_scored"]), default=None
            ),
        }
        if any(r["reference_s"] for r in reports):
            bare = sum(
                r["reference_images"] / r["reference_s"] for r in reports if r["reference_s"]
            )
            out["bare_forward_images_per_s"] = round(bare, 1)
            out["end_to_end_over_bare"] = round(out["images_per_s_steady"] / bare, 3)
        return out
