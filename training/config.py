"""The training run's configuration: one validated dataclass per concern (optimiser, data,
processes) and ``TrainConfig`` holding them with the model and loss configs.

Kept apart from the trainer so that recipes, the launcher and evaluation read configs
without importing the training loop.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from .core import config as cfg
from .losses import LossConfig
from .model import DualEncoderConfig

log = logging.getLogger("mofi.train")


@dataclasses.dataclass
class OptimConfig(cfg.StageConfig):
    """AdamW with linear warmup and cosine decay."""

    lr: float = cfg.field(1e-3, "peak learning rate of the heads and projections")
    tower_lr_mult: float = cfg.field(0.1, "the towers' learning rate as a fraction of lr")
    weight_decay: float = cfg.field(0.05, "AdamW weight decay (not on biases, norms, scale)")
    beta1: float = cfg.field(0.9, "AdamW beta1")
    beta2: float = cfg.field(0.98, "AdamW beta2")
    eps: float = cfg.field(1e-6, "AdamW eps")
    warmup_steps: int = cfg.field(20, "linear warmup steps")
    min_lr_ratio: float = cfg.field(0.0, "the cosine decays to lr * min_lr_ratio")
    grad_clip: float = cfg.field(1.0, "max gradient norm (0: off)")

    def validate(self) -> None:
        self._check(self.lr > 0, "lr", "must be > 0")
        self._check(self.tower_lr_mult >= 0, "tower_lr_mult", "must be >= 0")
        self._check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")


@dataclasses.dataclass
class DataConfig(cfg.StageConfig):
    """How I2E shards become batches."""

    batch_size: int = cfg.field(32, "images per rank per micro-batch")
    workers: int = cfg.field(1, "DataLoader worker processes per rank (0: decode in the trainer)")
    shuffle_buffer: int = cfg.field(1000, "per-worker shuffle buffer (samples)")
    image_size: int = cfg.field(0, "training resolution (0: the image tower's default)")
    flip: bool = cfg.field(True, "random horizontal flip (seeded per sample and epoch)")
    start_method: str = cfg.field("fork", "loader worker start method: fork, forkserver or spawn")

    def validate(self) -> None:
        self._check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._check(self.workers >= 0, "workers", "must be >= 0")
        self._check(
            self.start_method in ("fork", "forkserver", "spawn"),
            "start_method",
            "fork, forkserver or spawn",
        )


@dataclasses.dataclass
class DistConfig(cfg.StageConfig):
    """How many processes, where: torchrun's arguments. The same command runs multi-node."""

    nproc_per_node: int = cfg.field(1, "processes per node (one per GPU; any number on CPU)")
    nnodes: int = cfg.field(1, "nodes")
    rdzv_endpoint: str = cfg.field(
        "", "HOST:PORT of the rendezvous (c10d) for nnodes > 1; empty: single node, standalone"
    )
    rdzv_id: str = cfg.field("mofi", "rendezvous job id (the same on every node)")
    device: str = cfg.field("auto", "auto (CUDA if present), cuda or cpu")
    timeout_s: int = cfg.field(600, "collective timeout")

    def validate(self) -> None:
        self._check(self.nproc_per_node >= 1, "nproc_per_node", "must be >= 1")
        self._check(self.nnodes >= 1, "nnodes", "must be >= 1")
        self._check(
            self.nnodes == 1 or ":" in self.rdzv_endpoint,
            "rdzv_endpoint",
            "HOST:PORT is needed when nnodes > 1",
        )


@dataclasses.dataclass
class TrainConfig(cfg.StageConfig):
    """A MOFI training run."""

    name: str = cfg.field("base", "config name")
    model: DualEncoderConfig = cfg.field(
        factory=lambda: DualEncoderConfig(lock_image=False), doc="architecture"
    )
    loss: LossConfig = cfg.field(factory=LossConfig, doc="losses")
    optim: OptimConfig = cfg.field(factory=OptimConfig, doc="optimiser")
    data: DataConfig = cfg.field(factory=DataConfig, doc="data loading")
    dist: DistConfig = cfg.field(factory=DistConfig, doc="processes")
    epochs: int = cfg.field(1, "passes over the I2E shards")
    max_steps: int = cfg.field(0, "stop after this many optimiser steps (0: run all epochs)")
    grad_accum: int = cfg.field(1, "micro-batches per optimiser step")
    precision: str = cfg.field("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16")
    seed: int = cfg.field(0, "seed of initialisation, data order and augmentation")
    checkpoint_every: int = cfg.field(100, "optimiser steps between checkpoints")
    keep_checkpoints: int = cfg.field(2, "checkpoints kept (the newest)")
    log_every: int = cfg.field(10, "steps between log lines (every step goes to metrics.jsonl)")
    tensorboard: bool = cfg.field(True, "write TensorBoard event files under OUT/tb")
    compile: bool = cfg.field(
        False, "torch.compile the towers (GPUs: fused kernels; the first steps pay the compile)"
    )

    def validate(self) -> None:
        self._check(self.epochs >= 1, "epochs", "must be >= 1")
        self._check(self.max_steps >= 0, "max_steps", "must be >= 0")
        self._check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        self._check(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            "precision",
            "auto, fp32, bf16 or fp16",
        )
        self._check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        self._check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        if self.model.lock_image and self.loss.uses_class:
            # a linear probe on the tower (the demo config, measured best on small corpora): say so
            log.info("the image tower is locked: only the projections and the head train")

    def resume_signature(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this config."""
        d = self.to_dict()
        return {
            "model": d["model"],
            "loss": d["loss"],
            "batch_size": self.data.batch_size,
            "workers": self.data.workers,
            "image_size": self.data.image_size,
            "seed": self.seed,
            "grad_accum": self.grad_accum,
            "world_size": self.dist.nproc_per_node * self.dist.nnodes,
        }
