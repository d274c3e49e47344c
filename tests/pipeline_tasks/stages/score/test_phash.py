"""The perceptual hash: the textbook DCT hash, bit for bit; stable under resizes and
re-encodes, far apart for different pictures; found in every band bucket it should be."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.fft import dctn

from pipeline_tasks.stages.hygiene import lsh
from pipeline_tasks.stages.score.phash import hamming, pack, phash


def _picture(rng: np.random.Generator, size=(160, 120)) -> Image.Image:
    """A smooth random picture (low-frequency field plus a few discs), RGB."""
    w, h = size
    field = rng.standard_normal((3, 6, 6))
    x = torch.from_numpy(field).float()[None]
    im = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)[0].numpy()
    yy, xx = np.mgrid[:h, :w]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 30)
        im[:, (xx - cx) ** 2 + (yy - cy) ** 2 < r * r] += rng.standard_normal((3, 1))
    im = (im - im.min()) / (im.max() - im.min()) * 255
    return Image.fromarray(im.transpose(1, 2, 0).astype(np.uint8))


def _batch(*ims: Image.Image, side: int = 96) -> torch.Tensor:
    """As the scorer feeds them: each picture resized to ``side`` (the test's crop)."""
    arr = [np.asarray(im.convert("RGB").resize((side, side), Image.BICUBIC)) for im in ims]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).contiguous()


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_the_hash_is_the_textbook_dct_hash():
    rng = np.random.default_rng(0)
    x = _batch(*(_picture(rng) for _ in range(5)))
    grey = (x.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    small = grey.reshape(5, 32, 3, 32, 3).mean((2, 4)).numpy()  # 96 -> 32: 3 x 3 boxes
    want = []
    for s in small:
        low = dctn(s, norm="ortho")[:8, :8].ravel()
        want.append(low > np.median(low))
    assert (phash(x) == pack(np.array(want))).all()
    assert phash(x).dtype == np.int64 and len(phash(x[:0])) == 0
    with pytest.raises(ValueError, match="3, h, w"):
        phash(x[:, :1])


def test_resizes_and_reencodes_stay_close_and_different_pictures_do_not():
    rng = np.random.default_rng(1)
    originals = [_picture(rng) for _ in range(40)]
    copies = []
    for i, im in enumerate(originals):
        s = 0.4 + 0.5 * i / len(originals)
        small = im.resize((round(im.width * s), round(im.height * s)), Image.BILINEAR)
        copies.append(_jpeg(small, 30 + i))
    h, hc = phash(_batch(*originals)), phash(_batch(*copies))
    assert hamming(h, hc).max() <= 6  # of 64 (photographs: at most 4, README)
    d = hamming(h[:, None], h[None, :])
    assert d[~np.eye(len(h), dtype=bool)].min() > 8


def test_band_buckets_find_every_pair_within_the_distance():
    rng = np.random.default_rng(2)
    a = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 2000, dtype=np.int64)
    for dist in (0, 1, 4, 7):
        flips = np.zeros((len(a), 64), bool)
        for r in flips:
            r[rng.choice(64, dist, replace=False)] = True
        b = a ^ pack(flips)
        assert (hamming(a, b) == dist).all()
        bands = dist + 1
        met = (lsh.band_keys(a, bands) == lsh.band_keys(b, bands)).any(axis=1)
        assert met.all()
    # one band fewer than the pigeonhole needs misses some pairs at that distance
    assert not (lsh.band_keys(a, 7) == lsh.band_keys(b, 7)).any(axis=1).all()
