"""A picture re-rendered as a new web image: crop, scale, aspect, flip, background, colour,
JPEG quality, all drawn from the sample's generator."""

from __future__ import annotations

import io
import math

import numpy as np

from .config import CorpusConfig


def load_picture(path: str, max_side: int):
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
    bbox = im.getchannel("A").getbbox()
    if bbox:
        im = im.crop(bbox)
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)
    return im


def _background(w: int, h: int, rng: np.random.Generator, c: CorpusConfig):
    from PIL import Image

    kind = rng.random()
    if kind < c.white_background_prob:
        return Image.new("RGB", (w, h), (255, 255, 255))
    col = tuple(int(x) for x in rng.integers(0, 256, 3))
    if kind < c.white_background_prob + 0.25:
        return Image.new("RGB", (w, h), col)
    if kind < c.white_background_prob + 0.5:
        col2 = tuple(int(x) for x in rng.integers(0, 256, 3))
        mask = Image.linear_gradient("L").resize((w, h))
        if rng.random() < 0.5:
            mask = mask.rotate(90, expand=False)
        return Image.composite(Image.new("RGB", (w, h), col), Image.new("RGB", (w, h), col2), mask)
    g = int(rng.integers(2, 7))
    blot = rng.integers(0, 256, (g, g, 3), dtype=np.uint8)
    return Image.fromarray(blot, "RGB").resize((w, h), Image.BICUBIC)


def render(picture, rng: np.random.Generator, c: CorpusConfig) -> bytes:
    """One distinct JPEG of ``picture`` (RGBA): crop, scale, flip, background, colour, quality."""
    from PIL import Image, ImageEnhance, ImageOps

    pw, ph = picture.size
    fx = math.sqrt(rng.uniform(c.crop_min_area, 1.0))
    fy = math.sqrt(rng.uniform(c.crop_min_area, 1.0))
    cw, ch = max(4, int(pw * fx)), max(4, int(ph * fy))
    x0 = int(rng.integers(0, pw - cw + 1))
    y0 = int(rng.integers(0, ph - ch + 1))
    obj = picture.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        obj = ImageOps.mirror(obj)
    side = int(rng.integers(c.min_side, c.max_side + 1))
    aspect = rng.uniform(0.75, 1.333)
    w, h = (
        (side, max(16, int(side / aspect))) if aspect >= 1 else (max(16, int(side * aspect)), side)
    )
    fill = rng.uniform(0.55, 0.95)
    s = fill * min(w / cw, h / ch)
    ow, oh = max(2, int(cw * s)), max(2, int(ch * s))
    obj = obj.resize((ow, oh), Image.BILINEAR)
    canvas = _background(w, h, rng, c)
    px = int(rng.integers(0, w - ow + 1))
    py = int(rng.integers(0, h - oh + 1))
    canvas.paste(obj, (px, py), obj)
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        canvas = enh(canvas).enhance(float(rng.uniform(0.75, 1.25)))
    buf = io.BytesIO()
    q = int(rng.integers(c.jpeg_quality[0], c.jpeg_quality[1] + 1))
    canvas.save(buf, format="JPEG", quality=q, optimize=False)
    return buf.getvalue()
