"""The one place that knows how training is parallelised: process-group setup and DDP."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); a plain process is rank 0 of 1.

    NCCL on CUDA (one device per local rank), gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda")
    if device_spec not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device_spec!r}")
    if device_spec == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
    return DistInfo(rank, local_rank, world_size, device)


def wrap_ddp(
    module: torch.nn.Module, info: DistInfo, compile_towers: bool = False
) -> torch.nn.Module:
    """DDP around ``module`` (as is for one process); ``compile_towers``: torch.compile each
    tower in place first (``nn.Module.compile`` keeps the parameter names, so checkpoints do
    not change)."""
    if compile_towers:
        for name in ("image_tower", "text_tower"):
            tower = getattr(getattr(module, "encoder", None), name, None)
            if tower is not None and any(p.requires_grad for p in tower.parameters()):
                tower.compile()
    if info.world_size == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module,
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
    )


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def all_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean over ranks of each value, in one all-reduce."""
    if info.world_size == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def clip_grad_norm_(
    replicated: list[torch.Tensor], sharded: list[torch.Tensor], max_norm: float, info: DistInfo
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over parameters some of which are sharded over ranks.

    ``replicated`` gradients are the same on every rank (DDP averaged them); ``sharded`` ones
    (the Partial-FC head's class slices) are each rank's own part of one whole. The norm is
    that of the whole gradient, so every rank scales by the same factor: clipping each rank by
    its local norm would let the replicated weights drift apart between ranks (and a resumed
    run, which gives every rank rank 0's weights, would then differ from the uninterrupted one).
    """
    grads = [p.grad for p in replicated if p.grad is not None]
    shard = [p.grad for p in sharded if p.grad is not None]
    dev = (grads or shard)[0].device if (grads or shard) else info.device
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    if grads:
        sq = sq + torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
        ).pow(2)
    shard_sq = torch.zeros((), dtype=torch.float32, device=dev)
    if shard:
        shard_sq = shard_sq + sum(g.detach().float().pow(2).sum() for g in shard)
    if info.world_size > 1 and sharded:
        dist.all_reduce(shard_sq)
    total = (sq + shard_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads + shard:
        g.mul_(coef.to(g.dtype))
    return total


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
