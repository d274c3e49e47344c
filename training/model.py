"""Dual encoder (image tower + text tower + projections to a shared space) and checkpoint I/O.

The same module serves three roles:

* the packaged CLIP-style scorer: both towers locked (the LiT recipe), only the two
  projections and the temperature trained, by ``mofi scorer-bootstrap``;
* the MOFI model (issue: training): the image tower trained, plus an entity head;
* any open_clip model, wrapped through its towers.

Checkpoints are plain dicts of tensors and primitives, saved atomically and loaded with
``torch.load(weights_only=True)``. Locked towers built from packaged weights are not saved
(``save_towers=False``): they are rebuilt from the package on load, which keeps the
scorer's checkpoint at a few MB.
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DualEncoderConfig
from .core import config as cfg
from .core import storage
from .towers import build_image_tower, build_text_tower

CHECKPOINT_VERSION = 1


def _head(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim, bias=False)
        )
    if in_dim != out_dim:
        raise cfg.ConfigError(
            f"proj='none' needs tower dims equal to embed_dim ({in_dim} vs {out_dim})"
        )
    return nn.Identity()


class DualEncoder(nn.Module):
    def __init__(self, config: DualEncoderConfig, pretrained_towers: bool = True):
        super().__init__()
        self.config = config
        self.image_tower = build_image_tower(config.image_tower, pretrained_towers)
        self.text_tower = build_text_tower(config.text_tower, pretrained_towers)
        self.image_proj = _head(self.image_tower.output_dim, config.embed_dim, config.proj)
        if config.image_proj_init == "identity":
            if self.image_tower.output_dim != config.embed_dim:
                raise cfg.ConfigError(
                    f"image_proj_init = identity needs embed_dim = the image tower's width "
                    f"({self.image_tower.output_dim}), not {config.embed_dim}"
                )
            with torch.no_grad():
                self.image_proj.weight.copy_(torch.eye(config.embed_dim))
        self.text_proj = _head(self.text_tower.output_dim, config.embed_dim, config.proj)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        # Mean image embedding of the scorer's training images. A locked-tower scorer trained on
        # noisy labels gives generic entities ("stock", "image") a similarity to every image;
        # measuring similarity from the centre removes that shared component.
        self.register_buffer("image_center", torch.zeros(config.embed_dim))
        for tower, locked in (
            (self.image_tower, config.lock_image),
            (self.text_tower, config.lock_text),
        ):
            if locked:
                tower.requires_grad_(False)
                tower.eval()

    # preprocessing facts the data path needs
    @property
    def image_size(self) -> int:
        return self.config.image_size or self.image_tower.image_size

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.image_tower.mean)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.image_tower.std)

    def train(self, mode: bool = True):
        super().train(mode)
        # locked towers stay in eval mode (batch-norm statistics, dropout)
        if self.config.lock_image:
            self.image_tower.eval()
        if self.config.lock_text:
            self.text_tower.eval()
        return self

    def tokenize(self, texts: list[str], fixed_length: bool = False) -> dict[str, torch.Tensor]:
        return self.text_tower.tokenize(texts, fixed_length)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Tower output before projection."""
        return self.image_tower(images)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text_tower(**tokens)

    def project_image(self, feats: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.image_proj(feats.float()), dim=-1)
        if self.config.center_images:
            z = F.normalize(z - self.image_center, dim=-1)
        return z

    def project_text(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(feats.float()), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.image_features(images))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.project_text(self.text_features(tokens))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.config.max_logit_scale).exp()


def checkpoint_state(model: nn.Module, save_towers: bool) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if save_towers:
        return sd
    return {k: v for k, v in sd.items() if not k.startswith(("image_tower.", "text_tower."))}


def save_checkpoint(
    uri: str,
    kind: str,
    model_config: cfg.StageConfig,
    state: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
) -> None:
    """Atomic: the file appears whole or not at all (local rename or S3 upload completion)."""
    payload = {
        "version": CHECKPOINT_VERSION,
        "kind": kind,
        "config_class": type(model_config).__name__,
        "config": model_config.to_dict(),
        "state_dict": state,
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not storage.exists(uri):
        raise FileNotFoundError(f"no checkpoint at {uri}")
    with storage.open_read(uri) as f:
        head = f.read(4)
        if not head:
            raise cfg.ConfigError(f"checkpoint {uri} is empty (0 bytes)")
        if head != b"PK\x03\x04":  # torch.save writes a zip archive
            raise cfg.ConfigError(
                f"{uri} is not a readable checkpoint (not a torch.save zip archive)"
            )
        f.seek(0)
        try:
            payload = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as exc:  # pickle errors, truncated files
            cause = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise cfg.ConfigError(f"{uri} is not a readable checkpoint: {cause}") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "kind" not in payload:
        raise cfg.ConfigError(f"{uri} is not a mofi checkpoint (no kind/state_dict)")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise cfg.ConfigError(f"{uri} was written by a newer version ({payload['version']})")
    return payload


def load_dual_encoder(uri: str, map_location: str | torch.device = "cpu") -> DualEncoder:
    payload = load_checkpoint(uri, map_location)
    if payload["kind"] != "dual_encoder":
        raise cfg.ConfigError(f"{uri} holds a {payload['kind']!r} checkpoint, not a dual encoder")
    config = DualEncoderConfig.from_dict(payload["config"])
    model = DualEncoder(config, pretrained_towers=True)
    try:
        missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise cfg.ConfigError(
            f"{uri} does not match its config: {str(exc).splitlines()[0]}"
        ) from exc
    towers = ("image_tower.", "text_tower.")
    missing = [k for k in missing if not k.startswith(towers)]
    if missing or unexpected:
        raise cfg.ConfigError(
            f"{uri} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
