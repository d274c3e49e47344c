"""What DDP wraps in training (the dual encoder, with the entity head when it is not sharded)
and how its parameters are grouped for the optimiser."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import OptimConfig
from .model import DualEncoder


class MofiTrainModule(nn.Module):
    """What DDP wraps: the dual encoder, plus the entity head when it is not sharded."""

    def __init__(self, encoder: DualEncoder, head: nn.Module | None):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: torch.Tensor, text: Any | None):
        img = self.encoder.encode_image(images)
        txt = None
        if text is not None:
            if isinstance(text, torch.Tensor):  # precomputed locked-tower features
                txt = self.encoder.project_text(text)
            else:
                txt = self.encoder.encode_text(text)
        return img, txt, self.encoder.scale()


def param_groups(encoder: DualEncoder, head: nn.Module | None, oc: OptimConfig):
    towers, other = [], []
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        (towers if name.startswith(("image_tower.", "text_tower.")) else other).append((name, p))
    groups = []
    for params, mult in ((towers, oc.tower_lr_mult), (other, 1.0)):
        decay = [p for n, p in params if p.ndim >= 2]
        no_decay = [p for n, p in params if p.ndim < 2]
        groups.append({"params": decay, "weight_decay": oc.weight_decay, "lr_mult": mult})
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_mult": mult})
    # the head last, alone: its optimiser state is sharded like its weight
    groups.append(
        {
            "params": list(head.parameters()) if head is not None else [],
            "weight_decay": 0.0,
            "lr_mult": 1.0,
        }
    )
    return groups
