"""`mofi wise-ft`: the WiSE-FT curve of a fine-tuned model and the checkpoint at the chosen mix.

For each mixing weight ``alpha`` (0: the pretrained towers, 1: the fine-tuned model) the towers
are interpolated in memory (:mod:`training.wise`) and the retrieval mAP (GPR1200 protocol) is
measured on the validation folder, a folder the model did not train on; ``alpha`` is the
smallest one within ``tolerance`` of the best validation mAP. The report folders (other
domains, the test folders) are measured along the curve for the record only: they never
choose. The checkpoint at the chosen alpha is an ordinary dual-encoder checkpoint that
eval and the ``mofi`` scorer backend load.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from training.core import storage
from training.core.device import pick_device

from . import images
from .layout import folder_name
from .models import from_dual_encoder
from .retrieval import retrieval_map
from .run import EvalConfig, extract_features, query_mask

log = logging.getLogger(__name__)


def _map_on(model, uri: str, folder: images.EvalFolder, c: EvalConfig, device) -> float:
    """GPR1200-protocol mAP, singleton classes in the gallery but not queries (as `mofi eval`)."""
    import numpy as np

    feats, keep, _ = extract_features(model, folder, c, device, progress=False)
    labels = np.asarray(folder.labels)[keep]
    _, is_query = query_mask(labels, uri)
    return float(retrieval_map(feats, labels, device=device, is_query=is_query).metrics()["map"])


def wise_ft(
    model_uri: str,
    val_images: str,
    out_uri: str,
    alphas: list[float],
    tolerance: float = 0.01,
    report_images: list[str] | None = None,
    c: EvalConfig | None = None,
) -> dict[str, Any]:
    from training.model import DualEncoder, DualEncoderConfig, load_checkpoint
    from training.wise import choose_alpha, initial_tower_state, interpolate, wise_checkpoint

    c = c or EvalConfig(zero_shot=False, linear_probe=False)
    device = pick_device(c.device)
    payload = load_checkpoint(model_uri)
    if payload["kind"] != "dual_encoder":
        raise ValueError(f"{model_uri}: WiSE-FT needs a dual-encoder checkpoint (model.pt)")
    config = DualEncoderConfig.from_dict(payload["config"])
    initial = initial_tower_state(config)
    uris = {"val": val_images} | {folder_name(f): f for f in report_images or []}
    folders = {name: images.read_folder(uri) for name, uri in uris.items()}
    model = DualEncoder(config, pretrained_towers=False)
    curve: dict[str, list[tuple[float, float]]] = {k: [] for k in folders}
    for a in sorted(set(alphas)):
        model.load_state_dict(interpolate(payload["state_dict"], initial, a), strict=False)
        em = from_dual_encoder(model, f"wise:{a}", {}, device)
        for name, folder in folders.items():
            m = _map_on(em, uris[name], folder, c, device)
            curve[name].append((a, round(m, 4)))
            log.info("alpha %.2f %s mAP %.4f", a, name, m)
    alpha = choose_alpha(curve["val"], tolerance)
    extra = {
        "alpha": alpha,
        "tolerance": tolerance,
        "validation": val_images,
        "curve": curve,
        "source": model_uri,
    }
    wise_checkpoint(payload, initial, alpha, out_uri, extra)
    storage.write_json(os.path.splitext(out_uri)[0] + ".curve.json", extra)
    return {"out": out_uri, **extra}


def default_alphas() -> list[float]:
    return [round(i / 10, 1) for i in range(11)]
