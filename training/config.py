"""The training run's configuration: one validated dataclass per concern (model, loss,
optimiser, data, processes) and ``TrainConfig`` holding them.

Kept apart from the trainer so that recipes, the launcher and evaluation read configs
without importing the training loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

from .core import config as cfg

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mofi.train")

MODES = ("multitask", "supervised", "contrastive")


@dataclasses.dataclass
class LossConfig(cfg.StageConfig):
    """Which losses train the model and how they are weighted."""

    mode: str = cfg.field(
        "multitask", "multitask (lambda*class + (1-lambda)*contrastive), supervised or contrastive"
    )
    weight: float = cfg.field(0.5, "lambda: weight of the classification loss in multitask mode")
    scale: float = cfg.field(32.0, "CosFace scale s")
    margin: float = cfg.field(0.15, "CosFace margin m")
    sample_rate: float = cfg.field(
        1.0, "Partial FC: fraction of each rank's classes in the softmax (positives always kept)"
    )
    sharded_head: bool = cfg.field(
        True, "shard the class weights across ranks (model-parallel softmax, Partial FC)"
    )

    def validate(self) -> None:
        self._check(self.mode in MODES, "mode", f"one of {', '.join(MODES)}")
        self._check(0.0 <= self.weight <= 1.0, "weight", "must be in [0, 1]")
        self._check(self.scale > 0, "scale", "must be > 0")
        self._check(0.0 <= self.margin < 1.0, "margin", "must be in [0, 1)")
        self._check(0.0 < self.sample_rate <= 1.0, "sample_rate", "must be in (0, 1]")

    @property
    def uses_class(self) -> bool:
        return self.mode in ("multitask", "supervised")

    @property
    def uses_contrast(self) -> bool:
        return self.mode in ("multitask", "contrastive")

    def combine(self, l_class: torch.Tensor | None, l_con: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "supervised":
            return l_class
        if self.mode == "contrastive":
            return l_con
        return self.weight * l_class + (1.0 - self.weight) * l_con


@dataclasses.dataclass
class DualEncoderConfig(cfg.StageConfig):
    """Architecture of a dual encoder."""

    image_tower: str = cfg.field(
        "efficientnet-lite0", "efficientnet-lite0 (packaged weights) or openclip:ARCH[:CHECKPOINT]"
    )
    text_tower: str = cfg.field(
        "minilm-l6", "minilm-l6 (packaged weights) or openclip:ARCH[:CHECKPOINT]"
    )
    embed_dim: int = cfg.field(256, "shared embedding size")
    proj: str = cfg.field("mlp", "projection head: linear or mlp (Linear-GELU-Linear)")
    image_proj_init: str = cfg.field(
        "random",
        "random, or identity: a linear image projection that starts as the identity "
        "(embed_dim = the image tower's width), so the untrained model embeds images exactly "
        "as its pretrained tower does and WiSE-FT can mix the projection too",
    )
    lock_image: bool = cfg.field(True, "freeze the image tower")
    lock_text: bool = cfg.field(True, "freeze the text tower")
    init_logit_scale: float = cfg.field(
        math.log(1 / 0.07), "initial log temperature (CLIP: log(1/0.07))"
    )
    max_logit_scale: float = cfg.field(math.log(100.0), "the temperature is capped at 100")
    image_size: int = cfg.field(0, "input resolution (0: the tower's default)")
    center_images: bool = cfg.field(
        False, "subtract the mean image embedding (saved with the weights) before normalising"
    )

    def validate(self) -> None:
        self._check(self.embed_dim >= 8, "embed_dim", "must be >= 8")
        self._check(
            self.image_proj_init in ("random", "identity"), "image_proj_init", "random or identity"
        )
        self._check(
            self.image_proj_init == "random" or self.proj == "linear",
            "image_proj_init",
            "identity needs proj = linear",
        )
        self._check(self.proj in ("linear", "mlp", "none"), "proj", "linear, mlp or none")
        self._check(self.image_size == 0 or self.image_size >= 32, "image_size", "0 or >= 32")

    def random_init_towers(self) -> list[str]:
        """The towers that start from a random initialisation (``openclip:ARCH`` without a
        checkpoint): WiSE-FT has nothing to mix them with."""
        towers = (("image", self.image_tower), ("text", self.text_tower))
        return [
            f"the {kind} tower {name!r}"
            for kind, name in towers
            if name.startswith("openclip:") and len(name.split(":", 2)) < 3
        ]


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
