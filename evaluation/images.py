"""Evaluation image folders (GPR1200 naming) and the two preprocessing recipes.

Naming (``layout``): ``{class_id}_{anything}.jpg``, and a ``classes.json`` that names the
classes for zero-shot classification. Files are ordered by (class id, name), as GPR1200's
reader sorts by class id.

Preprocessing:

* ``model``: the model's own transform: PIL bicubic resize of the shorter side, centre crop,
  the model's mean and std;
* ``mofi``: what MOFI's released evaluation does: the image as a float tensor, resized
  (shorter side to 224, bicubic) *without antialiasing*, centre crop 224, CLIP mean and std.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from training.core import storage
from training.core.config import ConfigError
from training.transforms import OPENAI_MEAN, OPENAI_STD, as_rgb, preprocess, to_uint8_tensor

from .layout import CLASSES_FILE, class_of

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PREPROCESS = ("model", "mofi")
Image.MAX_IMAGE_PIXELS = 64_000_000


@dataclasses.dataclass
class EvalFolder:
    uri: str
    files: list[str]
    labels: list[int]
    class_names: dict[int, str]
    skipped: dict[str, int]

    @property
    def n_classes(self) -> int:
        return len(set(self.labels))


def _class_name(v: Any) -> str:
    if isinstance(v, dict):
        v = v.get("name") or v.get("category") or ""
    name = str(v).strip().rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[_-]+", " ", name).strip()


def read_folder(uri: str) -> EvalFolder:
    if not storage.exists(uri) and not storage.list_files(uri):
        raise FileNotFoundError(f"no image folder at {uri}")
    skipped: Counter[str] = Counter()
    entries = []
    for f in storage.list_files(uri):
        name = storage.basename(f)
        if not name.lower().endswith(IMAGE_SUFFIXES):
            if name != CLASSES_FILE:
                skipped["not_an_image"] += 1
            continue
        class_id = class_of(name)
        if class_id is None:
            skipped["no_class_prefix"] += 1
            continue
        entries.append((class_id, name, f))
    if not entries:
        raise ConfigError(
            f"{uri} has no images named {{class_id}}_{{anything}}.jpg (GPR1200 naming); "
            f"skipped: {dict(skipped) or 'nothing there'}"
        )
    entries.sort()
    names: dict[int, str] = {}
    cj = storage.join(uri, CLASSES_FILE)
    if storage.exists(cj):
        try:
            raw = storage.read_json(cj)
            names = {int(k): _class_name(v) for k, v in raw.items()}
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"{cj} is not a {{class_id: name}} JSON object: {exc}") from exc
    return EvalFolder(
        uri=uri,
        files=[e[2] for e in entries],
        labels=[e[0] for e in entries],
        class_names=names,
        skipped=dict(skipped),
    )


@dataclasses.dataclass
class Preprocess:
    kind: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, im: Image.Image) -> torch.Tensor:
        im = as_rgb(im)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        if self.kind == "model":
            x = preprocess(im, self.image_size).float() / 255.0
            return (x - mean) / std
        # mofi: float tensor, resize without antialiasing, centre crop
        x = to_uint8_tensor(im).float() / 255.0
        h, w = x.shape[1:]
        s = self.image_size / min(h, w)
        nh, nw = max(self.image_size, round(h * s)), max(self.image_size, round(w * s))
        x = F.interpolate(
            x[None], size=(nh, nw), mode="bicubic", antialias=False, align_corners=False
        )[0]
        top, left = (nh - self.image_size) // 2, (nw - self.image_size) // 2
        x = x[:, top : top + self.image_size, left : left + self.image_size]
        return (x - mean) / std


def make_preprocess(kind: str, image_size: int, mean, std) -> Preprocess:
    if kind not in PREPROCESS:
        raise ConfigError(f"preprocess must be one of {PREPROCESS}, got {kind!r}")
    if kind == "mofi":
        return Preprocess("mofi", 224, OPENAI_MEAN, OPENAI_STD)
    return Preprocess("model", image_size, tuple(mean), tuple(std))


class FolderImages(torch.utils.data.Dataset):
    """(tensor, index) per readable image; unreadable ones come back as (None, index)."""

    def __init__(self, files: list[str], preprocess: Preprocess):
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with storage.open_read(self.files[i]) as f:
                data = f.read()
            im = Image.open(io.BytesIO(data))
            im.load()
            return self.preprocess(im), i
        except Exception as exc:  # PIL raises many kinds for corrupt data
            log.warning("unreadable image %s: %s", self.files[i], exc)
            return None, i


def collate(items):
    good = [(x, i) for x, i in items if x is not None]
    bad = [i for x, i in items if x is None]
    x = torch.stack([g[0] for g in good]) if good else None
    return x, [g[1] for g in good], bad
