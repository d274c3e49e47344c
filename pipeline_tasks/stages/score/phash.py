"""A 64-bit perceptual hash (pHash) per image, the copy descriptor of the hygiene stage.

The classic DCT hash (Zauner 2010; what ``imagehash.phash`` computes per PIL image): the
picture in grey, averaged down to 32 x 32, its 2-D DCT-II, the 8 x 8 lowest frequencies,
one bit per coefficient above their median. Computed here in torch on the score worker's
uint8 batch (its decode, resize and centre crop), on the worker's device, batched: a few
small matrix products per batch.

A copy that keeps the whole picture (re-encoded, resized, recoloured slightly) keeps its
hash within a few bits; a different picture differs in about half of them. Crops and flips
change the hash: those copies are the visual features' to find. Bits are packed into a
signed int64 (bit ``i`` is ``1 << i``; bit 63 is the sign), ``hamming`` counts the bits two
hashes differ in.
"""

from __future__ import annotations

import numpy as np

SIDE = 32  # the grey thumbnail the DCT is taken of
LOW = 8  # the LOW x LOW lowest frequencies: 64 bits
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L" mode

_dct: dict = {}


def _dct_matrix(device):
    """The orthonormal DCT-II matrix of size SIDE on ``device`` (cached)."""
    import torch

    key = str(device)
    if key not in _dct:
        k = torch.arange(SIDE, dtype=torch.float64)[:, None]
        i = torch.arange(SIDE, dtype=torch.float64)[None]
        d = torch.cos(torch.pi * (2 * i + 1) * k / (2 * SIDE)) * (2.0 / SIDE) ** 0.5
        d[0] /= 2**0.5
        _dct[key] = d.to(device=device, dtype=torch.float32)
    return _dct[key]


def phash(batch_u8) -> np.ndarray:
    """(n,) int64 hashes of a (n, 3, h, w) uint8 RGB batch (torch, any device, or numpy)."""
    import torch
    import torch.nn.functional as F

    x = batch_u8 if isinstance(batch_u8, torch.Tensor) else torch.from_numpy(batch_u8)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"phash wants an (n, 3, h, w) batch, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not n:
        return np.zeros(0, np.int64)
    h, w = x.shape[-2:]
    luma = torch.tensor(LUMA, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    if h % SIDE == 0 and w % SIDE == 0:  # grey and box average in one strided convolution
        kh, kw = h // SIDE, w // SIDE  # (224 px: 7 x 7 boxes; 2.5-4x the two steps' speed)
        box = (luma / (kh * kw)).expand(1, 3, kh, kw).contiguous()
        small = F.conv2d(x.float(), box, stride=(kh, kw))[:, 0]
    else:
        grey = (x.float() * luma).sum(1, keepdim=True)
        small = F.interpolate(grey, size=(SIDE, SIDE), mode="area")[:, 0]  # box average
    d = _dct_matrix(x.device)
    freq = (d @ small @ d.T)[:, :LOW, :LOW].reshape(n, LOW * LOW)
    bits = (freq > freq.median(dim=1, keepdim=True).values).cpu().numpy()
    return pack(bits)


def pack(bits: np.ndarray) -> np.ndarray:
    """(n, 64) booleans -> (n,) int64, bit ``i`` of a row at ``1 << i``."""
    u = np.packbits(np.asarray(bits, bool), axis=1, bitorder="little")  # (n, 8) uint8
    return np.ascontiguousarray(u).view("<i8").reshape(-1)


def hamming(a, b) -> np.ndarray:
    """The number of bits in which the int64 hashes ``a`` and ``b`` differ (elementwise)."""
    x = np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64))
    return np.bitwise_count(x.view(np.uint64)).astype(np.int64)
