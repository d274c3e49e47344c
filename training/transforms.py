"""Image preprocessing with PIL (never torchvision.io): decode in loader workers, normalise on device.

Loader workers return uint8 tensors (4x less to move between processes than float32);
``normalize`` turns a batch into the model's dtype and memory layout on its device.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_shape(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """(new width, new height, left, top): shorter side to ``size``, then the central crop."""
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def resize_center_crop(im: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """Shorter side to ``size``, then the central ``size`` x ``size`` crop."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh, _, _ = resized_shape(w, h, size)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample, reducing_gap=3.0 if s < 0.5 else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def resize_center_crop_tensor(img: torch.Tensor, size: int) -> torch.Tensor:
    """The tensor twin of :func:`resize_center_crop` for a uint8 CHW image on any device:
    antialiased bicubic (PIL's kernel, a = -0.5, widened when shrinking), the same output
    size and crop, rounded back to uint8."""
    h, w = img.shape[-2:]
    nw, nh, left, top = resized_shape(w, h, size)
    if (nw, nh) != (w, h):
        x = torch.nn.functional.interpolate(
            img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )[0]
        img = x.round_().clamp_(0, 255).to(torch.uint8)
    return img[:, top : top + size, left : left + size]


def as_rgb(im: Image.Image) -> Image.Image:
    """``im`` in RGB mode; an RGB image is returned as is (``convert`` would copy it)."""
    return im if im.mode == "RGB" else im.convert("RGB")


def to_uint8_hwc(im: Image.Image) -> np.ndarray:
    """The RGB pixels as a read-only HWC uint8 array."""
    return np.asarray(as_rgb(im), dtype=np.uint8)


def to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(to_uint8_hwc(im).copy()).permute(2, 0, 1).contiguous()


def stack_hwc(arrays: list[np.ndarray]) -> torch.Tensor:
    """HWC arrays to one uint8 NCHW batch in channels-last layout: one copy, no transpose."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def preprocess(im: Image.Image, size: int) -> torch.Tensor:
    return to_uint8_tensor(resize_center_crop(im, size))


def normalize(
    batch_u8: torch.Tensor, mean, std, device=None, dtype=torch.float32, channels_last: bool = False
) -> torch.Tensor:
    x = batch_u8.to(device=device, non_blocking=True).to(dtype).div_(255.0)
    m = torch.tensor(mean, device=x.device, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=dtype).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
