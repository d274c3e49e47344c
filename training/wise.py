"""WiSE-FT: weight-space ensembles of a fine-tuned model and its pretrained starting point.

Fine-tuning a pretrained tower on a few thousand images of one domain overwrites features the
tower had for everything else (the demo model beats its ImageNet backbone on the demo's
held-out pictures, and loses to it on real photographs). Wortsman et al. (2022) show that
interpolating the weights, ``theta = (1 - alpha) * theta_0 + alpha * theta_ft``, keeps most
of the fine-tuned gain in domain and recovers the robustness of the starting point.

Here the towers are interpolated, and the image projection when it started as the identity
(``image_proj_init = identity``: at ``alpha = 0`` the model then embeds images exactly as its
pretrained tower does); a randomly initialised projection and the entity head have no
pretrained counterpart and stay fine-tuned. ``alpha`` is chosen on a validation folder the model did
not train on, as the smallest ``alpha`` whose validation mAP is within ``tolerance`` of the
best one: the model closest to its pretrained weights that the validation data allows.
"""

from __future__ import annotations

from typing import Any

import torch

TOWERS = ("image_tower.", "text_tower.")
IDENTITY_PROJ = "image_proj."  # mixed too when it started as the identity


def initial_tower_state(config) -> dict[str, torch.Tensor]:
    """The towers' weights before fine-tuning, as built from the config's pretrained sources
    (and the image projection's, when it starts as the identity)."""
    from .model import DualEncoder

    for tower in config.random_init_towers():
        raise ValueError(
            f"WiSE-FT: {tower} started from a random initialisation; there are no pretrained "
            "weights to mix with (use openclip:ARCH:/path/to/ckpt or a packaged tower)"
        )
    init = DualEncoder(config, pretrained_towers=True)
    keep = TOWERS + ((IDENTITY_PROJ,) if config.image_proj_init == "identity" else ())
    return {k: v for k, v in init.state_dict().items() if k.startswith(keep)}


def interpolate(
    finetuned: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``finetuned`` with every tower tensor moved to ``(1 - alpha) * initial + alpha * ft``.
    Integer buffers (batch-norm counters) are taken from the fine-tuned model."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha}: must be in [0, 1]")
    out = dict(finetuned)
    for k, v0 in initial.items():
        v1 = finetuned.get(k)
        if v1 is None or v1.shape != v0.shape:
            raise ValueError(f"{k}: the fine-tuned and initial towers differ in shape")
        out[k] = torch.lerp(v0.to(v1.dtype), v1, alpha) if v1.is_floating_point() else v1
    return out


def choose_alpha(curve: list[tuple[float, float]], tolerance: float) -> float:
    """The smallest alpha whose score is within ``tolerance`` of the best score."""
    best = max(s for _, s in curve)
    return min(a for a, s in curve if s >= best - tolerance)


def wise_checkpoint(
    payload: dict[str, Any],
    initial: dict[str, torch.Tensor],
    alpha: float,
    out_uri: str,
    extra: dict[str, Any],
) -> str:
    """Write ``out_uri``: the dual encoder of the loaded checkpoint ``payload`` with its towers
    interpolated towards ``initial`` (:func:`initial_tower_state`)."""
    from .model import DualEncoderConfig, save_checkpoint

    config = DualEncoderConfig.from_dict(payload["config"])
    state = interpolate(payload["state_dict"], initial, alpha)
    save_checkpoint(out_uri, "dual_encoder", config, state, {**payload["extra"], "wise_ft": extra})
    return out_uri
