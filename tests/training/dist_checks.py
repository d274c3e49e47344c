"""Run under torchrun with 2 processes (gloo): the sharded head and the gathered contrastive loss
give the single-process loss and gradients. Exits non-zero on any mismatch.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/training/dist_checks.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training.losses import ShardedCosFaceHead, contrastive_loss, cosface_loss, gather_shards

TOL = {"rtol": 1e-5, "atol": 1e-6}


def check_head(rank: int, ws: int, n_classes: int, batch: int, dim: int = 16) -> None:
    g = torch.Generator().manual_seed(n_classes)
    x_all = torch.randn(ws * batch, dim, generator=g)
    y_all = torch.randint(0, n_classes, (ws * batch,), generator=g)
    w_full = torch.randn(n_classes, dim, generator=g)
    s, m = 32.0, 0.15
    # reference: one process, whole batch, whole weight
    xr, wr = x_all.clone().requires_grad_(), w_full.clone().requires_grad_()
    ref = cosface_loss(xr, wr, y_all, s, m)
    ref.backward()
    # sharded
    head = ShardedCosFaceHead(n_classes, dim, rank, ws, s, m)
    head.load_full_weight(w_full)
    x = x_all[rank * batch : (rank + 1) * batch].clone().requires_grad_()
    loss = head(x, y_all[rank * batch : (rank + 1) * batch])
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), **TOL)
    # the weight gradient of each shard, gathered, is the full gradient
    torch.testing.assert_close(gather_shards(head.weight.grad, n_classes, ws), wr.grad, **TOL)
    # features: world_size x the global gradient (DDP's averaging divides it back)
    torch.testing.assert_close(x.grad / ws, xr.grad[rank * batch : (rank + 1) * batch], **TOL)
    torch.testing.assert_close(head.full_weight(), w_full, rtol=0, atol=0)
    # Partial FC class sampling runs and keeps every positive
    sampled = ShardedCosFaceHead(n_classes, dim, rank, ws, s, m, sample_rate=0.5)
    sampled.load_full_weight(w_full)
    ls = sampled(
        x.detach(), y_all[rank * batch : (rank + 1) * batch], torch.Generator().manual_seed(3)
    )
    assert torch.isfinite(ls), ls


def check_contrastive(rank: int, ws: int, batch: int = 6, dim: int = 8) -> None:
    g = torch.Generator().manual_seed(7)
    img = F.normalize(torch.randn(ws * batch, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(ws * batch, dim, generator=g), dim=-1)
    ids = torch.randint(0, 5, (ws * batch,), generator=g)  # repeated ids: shared positives
    scale = torch.tensor(10.0)
    ir, tr = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref = contrastive_loss(ir, tr, ids, scale)
    ref.backward()
    sl = slice(rank * batch, (rank + 1) * batch)
    i, t = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
    loss = contrastive_loss(i, t, ids[sl], scale, rank, ws)
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / ws, ref.detach(), **TOL)
    torch.testing.assert_close(i.grad / ws, ir.grad[sl], **TOL)
    torch.testing.assert_close(t.grad / ws, tr.grad[sl], **TOL)


def check_clip(rank: int, ws: int, n_classes: int = 7, dim: int = 5) -> None:
    """Clipping a replicated + sharded gradient scales every rank by the whole gradient's
    norm, as clipping the unsharded parameters in one process does."""
    from training.distributed import DistInfo, clip_grad_norm_
    from training.losses import class_range

    g = torch.Generator().manual_seed(11)
    rep_grad = torch.randn(4, 3, generator=g) * 3  # the same on every rank (DDP-averaged)
    head_grad = torch.randn(n_classes, dim, generator=g) * 5
    ref_rep = torch.nn.Parameter(torch.zeros(4, 3))
    ref_head = torch.nn.Parameter(torch.zeros(n_classes, dim))
    ref_rep.grad, ref_head.grad = rep_grad.clone(), head_grad.clone()
    want = torch.nn.utils.clip_grad_norm_([ref_rep, ref_head], 1.0)
    lo, hi = class_range(n_classes, rank, ws)
    rep = torch.nn.Parameter(torch.zeros(4, 3))
    head = torch.nn.Parameter(torch.zeros(hi - lo, dim))
    rep.grad, head.grad = rep_grad.clone(), head_grad[lo:hi].clone()
    info = DistInfo(rank, rank, ws, torch.device("cpu"))
    got = clip_grad_norm_([rep], [head], 1.0, info)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(rep.grad, ref_rep.grad, **TOL)  # identical on every rank
    torch.testing.assert_close(head.grad, ref_head.grad[lo:hi], **TOL)


def main() -> None:
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    for n_classes, batch in ((8, 5), (7, 4), (101, 3)):  # 7 and 101: unequal shards
        check_head(rank, ws, n_classes, batch)
    check_contrastive(rank, ws)
    check_clip(rank, ws)
    dist.barrier()
    if rank == 0:
        print("dist checks passed")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
