"""MOFI's losses: large-margin cosine (CosFace) entity classification, the sharded
(Partial FC) version of its head, and the symmetric image-text contrastive loss.

Every function takes ``rank`` and ``world_size`` explicitly (1 process: 0 and 1) and is
tested against a brute-force single-process reference.

CosFace (Wang et al. 2018): with L2-normalised features x and class weights w_c,
``logits = s * (cos(w_c, x) - m * onehot(y))``; cross-entropy over all classes. Defaults
here: ``s = 32``, ``m = 0.15``. The CosFace paper uses s = 64, m = 0.35 for face recognition
with ~10k-100k identities trained from scratch; a smaller scale and margin keep short
fine-tuning runs from a pretrained tower stable with few images per class, and both are
configurable (``LossConfig``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .core import config as cfg

# ------------------------------------------------------------------ gathers


class _GatherScaled(torch.autograd.Function):
    """All-gather along dim 0; backward sums each rank's gradient for its own rows.

    ``grad_scale`` multiplies that gradient: the sharded head computes the loss of the *global*
    batch on every rank, and DDP later divides the backbone's gradients by world_size, so the
    head passes ``grad_scale = world_size`` to end with the gradient of the global mean loss
    (what insightface's Partial FC does).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, grad_scale: float) -> torch.Tensor:
        ctx.grad_scale = grad_scale
        ws = dist.get_world_size()
        out = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ws, rank = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // ws
        return grad[rank * n : (rank + 1) * n] * ctx.grad_scale, None


def gather_with_grad(x: torch.Tensor, world_size: int, grad_scale: float = 1.0) -> torch.Tensor:
    if world_size == 1:
        return x
    return _GatherScaled.apply(x, grad_scale)


def gather_no_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


# ------------------------------------------------------------------ classification


def cosface_logits(
    feats: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float, margin: float
) -> torch.Tensor:
    """Unsharded reference: s * (cos - m * onehot) over all classes."""
    cos = F.normalize(feats.float(), dim=-1) @ F.normalize(weight.float(), dim=-1).T
    onehot = F.one_hot(labels, weight.shape[0]).to(cos.dtype)
    return scale * (cos - margin * onehot)


def cosface_loss(feats, weight, labels, scale, margin) -> torch.Tensor:
    return F.cross_entropy(cosface_logits(feats, weight, labels, scale, margin), labels)


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes ``[lo, hi)`` owned by ``rank``: contiguous, sizes differ by at most one."""
    base, extra = divmod(num_classes, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class _DistSoftmaxCE(torch.autograd.Function):
    """Cross-entropy over logits whose class dimension is split across ranks.

    Every rank holds the logits of all (gathered) samples for its own classes. The max and
    the sum of exponentials are all-reduced; the loss is the mean over the global batch and
    is identical on every rank. Backward: softmax - onehot, divided by the batch size.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        # local_labels: index into this rank's columns, or -1 when another rank owns the class
        n = logits.shape[0]
        mx = logits.detach().max(dim=1, keepdim=True).values
        if dist.is_initialized():
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        ex = torch.exp(logits.detach() - mx)
        denom = ex.sum(dim=1, keepdim=True)
        if dist.is_initialized():
            dist.all_reduce(denom, op=dist.ReduceOp.SUM)
        prob = ex / denom
        mine = local_labels >= 0
        target = torch.zeros(n, device=logits.device, dtype=prob.dtype)
        target[mine] = prob[mine].gather(1, local_labels[mine, None]).squeeze(1)
        if dist.is_initialized():
            dist.all_reduce(target, op=dist.ReduceOp.SUM)
        ctx.save_for_backward(prob, local_labels)
        return -torch.log(target.clamp_min(1e-30)).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        prob, local_labels = ctx.saved_tensors
        g = prob.clone()
        mine = local_labels >= 0
        rows = torch.nonzero(mine).squeeze(1)
        g[rows, local_labels[rows]] -= 1.0
        return g * (grad / prob.shape[0]), None


class ShardedCosFaceHead(nn.Module):
    """CosFace head whose class weights are split across ranks (Partial FC).

    Each rank keeps ``weight`` for classes ``class_range(num_classes, rank, world_size)``.
    Forward all-gathers the features and labels of the global batch (with gradients), computes
    cosine logits against the local classes only, and the softmax cross-entropy over all
    classes is assembled with two all-reduces. Memory per rank: C / world_size x D weights and
    B_global x C / world_size logits, so millions of classes fit.

    ``sample_rate < 1``: each rank keeps the classes of the batch's positives it owns plus a
    seeded random subset of its other classes, ``sample_rate`` of its shard in all.

    The weight must not be wrapped in DDP (it differs per rank): keep the head outside the
    DDP module, and save it with ``full_weight`` (gathered on every rank).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        rank: int = 0,
        world_size: int = 1,
        scale: float = 32.0,
        margin: float = 0.15,
        sample_rate: float = 1.0,
    ):
        super().__init__()
        self.num_classes, self.dim = num_classes, dim
        self.rank, self.world_size = rank, world_size
        self.scale, self.margin, self.sample_rate = scale, margin, sample_rate
        self.lo, self.hi = class_range(num_classes, rank, world_size)
        if self.hi <= self.lo:
            raise cfg.ConfigError(
                f"{num_classes} classes cannot be sharded over {world_size} ranks: rank {rank} gets none"
            )
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, dim))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))

    def load_full_weight(self, full: torch.Tensor) -> None:
        if tuple(full.shape) != (self.num_classes, self.dim):
            raise cfg.ConfigError(
                f"head weight has shape {tuple(full.shape)}, expected {(self.num_classes, self.dim)}"
            )
        with torch.no_grad():
            self.weight.copy_(full[self.lo : self.hi])

    def full_weight(self) -> torch.Tensor:
        """The whole (num_classes, dim) weight, gathered from all ranks (a collective)."""
        return gather_shards(self.weight.detach(), self.num_classes, self.world_size)

    def forward(
        self, feats: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        ws = self.world_size
        x = gather_with_grad(feats.float(), ws, grad_scale=float(ws))
        y = gather_no_grad(labels, ws)
        w = self.weight
        local = torch.where((y >= self.lo) & (y < self.hi), y - self.lo, torch.full_like(y, -1))
        if self.sample_rate < 1.0:
            n_local = self.hi - self.lo
            keep = max(1, int(round(self.sample_rate * n_local)))
            pos = torch.unique(local[local >= 0])
            score = torch.rand(n_local, generator=generator, device=w.device)
            score[pos] = 2.0  # positives always kept
            idx = torch.topk(score, max(keep, len(pos))).indices.sort().values
            remap = torch.full((n_local,), -1, dtype=torch.long, device=w.device)
            remap[idx] = torch.arange(len(idx), device=w.device)
            local = torch.where(local >= 0, remap[local.clamp(min=0)], local)
            w = w[idx]
        cos = F.normalize(x, dim=-1) @ F.normalize(w.float(), dim=-1).T
        rows = torch.nonzero(local >= 0).squeeze(1)
        margin = torch.zeros_like(cos)
        margin[rows, local[rows]] = self.margin
        logits = self.scale * (cos - margin)
        if ws == 1:
            return F.cross_entropy(logits, local)
        return _DistSoftmaxCE.apply(logits, local)


def gather_shards(shard: torch.Tensor, total_rows: int, world_size: int) -> torch.Tensor:
    """Concatenate per-rank row shards of unequal size (``class_range``) on every rank."""
    if world_size == 1:
        return shard.clone()
    size = class_range(total_rows, 0, world_size)[1]  # rank 0 has the largest shard
    padded = torch.zeros((size, *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
    padded[: shard.shape[0]] = shard
    out = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(out, padded)
    parts = []
    for r in range(world_size):
        lo, hi = class_range(total_rows, r, world_size)
        parts.append(out[r][: hi - lo])
    return torch.cat(parts, 0)


# ------------------------------------------------------------------ contrastive


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    ids: torch.Tensor,
    scale: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised image and text features, across all ranks.

    The text of each image is its entity's text, so two images of one entity in a batch have
    the same text: those pairs are positives too (a soft target spread over equal ids), never
    negatives. With distinct ids this is CLIP's loss exactly. Features are gathered with
    gradients; each rank computes the loss of its own rows, and DDP's averaging of gradients
    gives the gradient of the global mean.
    """
    img_all = gather_with_grad(image, world_size)
    txt_all = gather_with_grad(text, world_size)
    ids_all = gather_no_grad(ids, world_size)
    # this rank's rows sit at [rank * n, (rank + 1) * n) of the gathered batch; the targets
    # find every positive (its own pair and any image of the same entity) by id
    logits_i = scale * image.float() @ txt_all.float().T  # (n, N)
    logits_t = scale * text.float() @ img_all.float().T
    target = (ids[:, None] == ids_all[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits_i, dim=1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(logits_t, dim=1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)
