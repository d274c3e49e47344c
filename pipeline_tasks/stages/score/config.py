"""``ScoreConfig``: which scorer, on which devices, decoding where, with which prompts; and
``BootstrapConfig``: how the packaged scorer's heads are trained when a run has none."""

from __future__ import annotations

import dataclasses

from training.core import config as cfg

from .prompts import DEFAULT_PROMPTS

BACKENDS = ("packaged", "open_clip", "mofi")


@dataclasses.dataclass
class ScoreConfig(cfg.StageConfig):
    """Which scorer, on which devices, with which prompts."""

    backend: str = cfg.field("packaged", "packaged, open_clip or mofi")
    model: str = cfg.field(
        "",
        "packaged/mofi: checkpoint URI (packaged default: RUN/scorer/packaged.pt); open_clip: ARCH, ARCH:HUB_TAG or ARCH:/path/ckpt.pt",
        output=False,  # where the weights are; the reuse key holds their fingerprint instead
    )
    batch_size: int = cfg.field(
        128, "images per forward pass (every pass has this shape: a shard's last batch is padded)"
    )
    decode: str = cfg.field(
        "auto",
        "where images are decoded: device (loader processes read tar members, JPEG batches are "
        "decoded, resized and cropped on the GPU: nvJPEG, PIL for what it rejects), processes "
        "(PIL in loader processes overlapped with the model), threads (a thread pool inside "
        "the worker, between forward passes: for CPU, where an overlapped decoder takes cores "
        "from the model's threads), auto (threads on CPU, device on CUDA)",
    )
    jpeg_draft: bool = cfg.field(
        True,
        "PIL paths: decode a JPEG at a reduced DCT scale when it is at least twice the model's "
        "input size (measured: labels move by less than 0.005; see README)",
    )
    loader_workers: int = cfg.field(
        0,
        "decode processes or threads per scoring worker; 0: auto (processes: the worker's share "
        "of the host's cores minus the model's threads; threads: the model's thread count)",
        output=False,
    )
    decode_phase_images: int = cfg.field(
        256,
        "decode=threads: images decoded before the model runs again (rounded up to whole "
        "batches); longer phases amortise the pool's ramp-up and the model's restart",
        output=False,
    )
    devices: str = cfg.field(
        "auto",
        "auto (every CUDA device, else cpu), cpu, or a comma list like cuda:0,cuda:1",
        output=False,
    )
    precision: str = cfg.field(
        "auto", "autocast: auto (bf16 on CUDA and bf16-capable CPUs), bf16, fp16, fp32"
    )
    prompts: tuple[str, ...] = cfg.field(
        DEFAULT_PROMPTS, "entity text prompts; their embeddings are averaged"
    )
    max_pixels: int = cfg.field(
        40_000_000, "images with more pixels are skipped (decompression bombs)"
    )
    text_batch_size: int = cfg.field(256, "entity prompts per text forward pass")
    nsfw: bool = cfg.field(
        False, "also score each image with Open NSFW (stage.nsfw; the hygiene stage filters)"
    )
    cache_uri: str = cfg.field(
        "", "entity embedding cache (default: RUN/score/_embedding_cache)", output=False
    )
    torch_threads: int = cfg.field(
        0, "model threads (0: every core on CPU, 2 on a GPU, whose host cores decode)", output=False
    )
    heap_mmap_threshold_mb: int = cfg.field(
        64,
        "glibc: allocations up to this size come from the reusable heap (0: glibc's default)",
        output=False,
    )
    heap_trim_threshold_mb: int = cfg.field(
        1024,
        "glibc: free heap kept for reuse before it is returned to the OS (0: glibc's default)",
        output=False,
    )

    def validate(self) -> None:
        self._check(self.backend in BACKENDS, "backend", f"one of {BACKENDS}")
        self._check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._check(self.loader_workers >= 0, "loader_workers", "must be >= 0")
        self._check(self.decode_phase_images >= 1, "decode_phase_images", "must be >= 1")
        self._check(
            self.decode in ("auto", "device", "processes", "threads"),
            "decode",
            "auto, device, processes or threads",
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


@dataclasses.dataclass
class BootstrapConfig(cfg.StageConfig):
    """Training the packaged scorer's projection heads."""

    objective: str = cfg.field(
        "entity", "entity (image vs. KB texts of its linked entities; needs ner) or caption"
    )
    max_pairs: int = cfg.field(20000, "use at most this many raw pairs (first shards first)")
    image_size: int = cfg.field(
        224, "tower input resolution (EfficientNet-Lite0's own: sharper than 192 on small corpora)"
    )
    embed_dim: int = cfg.field(256, "shared embedding size")
    proj: str = cfg.field("mlp", "projection heads: linear or mlp")
    epochs: int = cfg.field(40, "at most this many passes over the cached features")
    patience: int = cfg.field(
        5, "stop when the held-out loss has not improved for this many epochs"
    )
    batch_size: int = cfg.field(512, "contrastive batch")
    lr: float = cfg.field(2e-3, "AdamW learning rate (cosine decay)")
    weight_decay: float = cfg.field(0.05, "AdamW weight decay")
    val_fraction: float = cfg.field(0.1, "held-out images for early stopping")
    seed: int = cfg.field(0, "seed for head init and batch order")
    target_prior: str = cfg.field(
        "coherence",
        "how an image's linked candidates share its target: coherence (by visual consistency with "
        "the other images linking the same entity) or uniform",
    )
    coherence_tau: float = cfg.field(
        0.1, "temperature of the coherence prior (lower: closer to the most coherent candidate)"
    )
    loader_workers: int = cfg.field(1, "decode processes")
    precision: str = cfg.field("auto", "autocast for the locked towers: auto, bf16, fp32")

    def validate(self) -> None:
        self._check(self.max_pairs >= 16, "max_pairs", "must be >= 16")
        self._check(self.epochs >= 1, "epochs", "must be >= 1")
        self._check(self.batch_size >= 2, "batch_size", "must be >= 2")
        self._check(0.01 <= self.val_fraction < 0.5, "val_fraction", "must be in [0.01, 0.5)")
        self._check(self.objective in ("entity", "caption"), "objective", "entity or caption")
        self._check(self.patience >= 1, "patience", "must be >= 1")
        self._check(
            self.target_prior in ("coherence", "uniform"), "target_prior", "coherence or uniform"
        )
        self._check(self.coherence_tau > 0, "coherence_tau", "must be > 0")
