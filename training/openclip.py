"""One way to build an open_clip model from a spec, for scoring, evaluation and the towers.

A spec is ``ARCH`` (random init: tests, benchmarks), ``ARCH:HUB_TAG`` (needs hub access) or
``ARCH:/path/to/checkpoint.pt`` (local weights, ``.pt`` or ``.safetensors``). The project's
small configs in ``training/model_configs`` are registered first, so ``mofi-tiny-vit`` works
everywhere an open_clip name does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

from .core import storage
from .core.compat import import_open_clip
from .core.config import ConfigError

MODEL_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


def register_project_model_configs() -> None:
    """Make the small open_clip configs shipped in training/model_configs known to open_clip."""
    open_clip = import_open_clip()
    if os.path.isdir(MODEL_CONFIG_DIR) and "mofi-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def parse_spec(spec: str) -> tuple[str, str]:
    """``ARCH[:TAG_OR_PATH]`` -> (arch, pretrained or "")."""
    arch, _, pretrained = spec.partition(":")
    if not arch:
        raise ConfigError(f"open_clip spec {spec!r} has no architecture (ARCH[:TAG_OR_PATH])")
    return arch, pretrained


@dataclasses.dataclass
class OpenClipModel:
    """A built open_clip model with what its data path needs."""

    spec: str
    arch: str
    pretrained: str
    model: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def fingerprint(self) -> str:
        return spec_fingerprint(self.spec)


def spec_fingerprint(spec: str) -> str:
    """Identifies the weights without building the model: the architecture and the
    checkpoint's content (or the hub tag)."""
    arch, weights = parse_spec(spec)
    if weights and (os.path.exists(weights) or storage.is_s3(weights)):
        weights = storage.fingerprint(weights)
    return hashlib.sha1(f"open_clip:{arch}:{weights}".encode()).hexdigest()[:16]


def create_model(arch: str, pretrained: str = "", init_seed: int | None = None):
    """The bare ``open_clip.create_model``, with the project's configs known and clear errors.

    ``init_seed``: random initialisation from this seed, without touching the caller's RNG
    (torch's own initial seed differs per process, so an unseeded random-init model differs
    between the process that embeds the entity texts and the one that embeds the images)."""
    import torch

    open_clip = import_open_clip()
    register_project_model_configs()
    if arch not in open_clip.list_models():
        raise ConfigError(f"open_clip has no architecture {arch!r}")
    try:
        if init_seed is None:
            return open_clip.create_model(arch, pretrained=pretrained or None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return open_clip.create_model(arch, pretrained=pretrained or None)
    except Exception as exc:  # hub unreachable, bad or mismatched checkpoint
        raise ConfigError(f"cannot load open_clip {arch}:{pretrained}: {exc}") from exc


def load_open_clip(spec: str, init_seed: int | None = None) -> OpenClipModel:
    open_clip = import_open_clip()
    arch, pretrained = parse_spec(spec)
    model = create_model(arch, pretrained, init_seed)
    pcfg = open_clip.get_model_preprocess_cfg(model)
    size = pcfg.get("size", 224)
    return OpenClipModel(
        spec=spec,
        arch=arch,
        pretrained=pretrained,
        model=model,
        tokenizer=open_clip.get_tokenizer(arch),
        image_size=size if isinstance(size, int) else size[0],
        mean=tuple(pcfg.get("mean") or open_clip.OPENAI_DATASET_MEAN),
        std=tuple(pcfg.get("std") or open_clip.OPENAI_DATASET_STD),
    )
