"""Losses against brute-force references; the 2-process (gloo) equivalence of the sharded head."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from training.config import LossConfig
from training.core.config import ConfigError
from training.losses import (
    ShardedCosFaceHead,
    class_range,
    contrastive_loss,
    cosface_logits,
    cosface_loss,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def test_cosface_logits_by_hand():
    feats = torch.tensor([[3.0, 4.0]])  # normalised: (0.6, 0.8)
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: e1, e2
    logits = cosface_logits(feats, weight, torch.tensor([1]), scale=10.0, margin=0.2)
    torch.testing.assert_close(logits, torch.tensor([[6.0, 10.0 * (0.8 - 0.2)]]))


def test_single_process_head_matches_reference():
    torch.manual_seed(0)
    head = ShardedCosFaceHead(9, 16, scale=32.0, margin=0.15)
    x, y = torch.randn(5, 16), torch.randint(0, 9, (5,))
    want = cosface_loss(x, head.weight.detach(), y, 32.0, 0.15)
    torch.testing.assert_close(head(x, y), want)


def test_margin_makes_the_loss_larger():
    torch.manual_seed(0)
    x, w, y = torch.randn(8, 4), torch.randn(3, 4), torch.randint(0, 3, (8,))
    assert cosface_loss(x, w, y, 16.0, 0.3) > cosface_loss(x, w, y, 16.0, 0.0)


def test_contrastive_with_distinct_ids_is_clip_loss():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(20.0)
    logits = scale * img @ txt.T
    target = torch.arange(6)
    want = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    torch.testing.assert_close(contrastive_loss(img, txt, torch.arange(6), scale), want)


def test_contrastive_shared_entity_is_not_a_negative():
    # images 0 and 1 show the same entity; image 1 sits on image 0's text. As a negative that
    # text pushes image 1 away hard; with the ids shared it is half of image 1's target.
    txt = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)

    def pull_towards_twin_text(ids):
        img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
        contrastive_loss(img, txt, torch.tensor(ids), torch.tensor(10.0)).backward()
        return -(img.grad[1] @ txt[0]).item()  # < 0: gradient descent moves image 1 away

    shared, distinct = pull_towards_twin_text([4, 4, 9]), pull_towards_twin_text([4, 5, 9])
    assert distinct < 0
    assert abs(shared) < 0.3 * abs(distinct)


def test_class_ranges_cover_all_classes_once():
    for n, ws in ((10, 3), (7, 2), (5, 5), (1000, 8)):
        ranges = [class_range(n, r, ws) for r in range(ws)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_too_many_ranks_for_the_classes():
    with pytest.raises(ConfigError, match="cannot be sharded"):
        ShardedCosFaceHead(2, 4, rank=2, world_size=3)


def test_loss_config_modes():
    lc = LossConfig(weight=0.25)
    a, b = torch.tensor(2.0), torch.tensor(4.0)
    assert lc.combine(a, b) == pytest.approx(0.25 * 2 + 0.75 * 4)
    assert LossConfig(mode="supervised").combine(a, None) == a
    assert LossConfig(mode="contrastive").combine(None, b) == b
    with pytest.raises(ConfigError, match="mode"):
        LossConfig(mode="both")


@pytest.mark.slow
def test_sharded_head_and_contrastive_match_single_process_on_two_gloo_ranks():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            os.path.join(HERE, "dist_checks.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dist checks passed" in proc.stdout
