"""The models `mofi eval` compares, behind one interface.

MODEL is any spec of ``training.encoders.load_encoder`` (the one model loader, shared with
scoring): a checkpoint of ours (``model.pt``, a scorer, or a training state), an open_clip
model (``open_clip:ARCH[:TAG_OR_PATH]``) or ``packaged`` (the EfficientNet-Lite0 ImageNet
backbone; no text tower, so no zero-shot). Features are L2-normalised embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from training.core import storage
from training.encoders import Encoder, load_encoder
from training.encoders import from_dual_encoder as _encoder_of


@dataclasses.dataclass
class EvalModel:
    name: str
    kind: str
    net: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    encode_image: Any
    encode_text: Any | None  # list[str] -> (n, d), or None
    info: dict[str, Any]


def _unit(fn):
    return lambda x: F.normalize(fn(x).float(), dim=-1)


def _eval_model(enc: Encoder, name: str) -> EvalModel:
    text = enc.encode_text
    return EvalModel(
        name=name,
        kind=enc.kind,
        net=enc.model,
        image_size=enc.image_size,
        mean=enc.mean,
        std=enc.std,
        encode_image=enc.encode_image if enc.normalized else _unit(enc.encode_image),
        encode_text=text if text is None or enc.normalized else _unit(text),
        info=enc.info,
    )


def from_dual_encoder(model, name: str, info: dict[str, Any], device: torch.device) -> EvalModel:
    """An in-memory dual encoder of ours (a checkpoint, or weights made on the fly: WiSE-FT)."""
    return _eval_model(_encoder_of(model, name, "", info, device), name)


def load_eval_model(spec: str, device: torch.device) -> EvalModel:
    enc = load_encoder(spec, device)
    if enc.kind == "mofi":
        name = f"mofi:{storage.basename(spec)}"
    elif enc.kind == "open_clip":
        name = enc.spec
    else:
        name = "packaged:efficientnet-lite0"
    return _eval_model(enc, name)
