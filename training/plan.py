"""A training run's plan, and every check that can fail before compute is spent.

* the learning-rate schedule (linear warmup, cosine decay) and the steps of each epoch;
* the per-step seed every rank draws its randomness from (so a resumed run reproduces the
  uninterrupted one);
* :func:`preflight` (also run by `mofi train` before torchrun starts): the I2E manifest, the
  plan, the head's sharding, and whether ``OUT``'s newest checkpoint can be resumed.
"""

from __future__ import annotations

import json
import math
from typing import Any

from . import data as data_mod
from .config import TrainConfig
from .core import config as cfg
from .layout import TrainLayout
from .model import load_checkpoint

TRAIN_KIND = "mofi_train_state"


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def epoch_plan(config: TrainConfig, manifest: data_mod.I2EManifest, world_size: int) -> list[int]:
    """Optimiser steps in each epoch (capped by max_steps)."""
    out, total = [], 0
    for e in range(config.epochs):
        batches = data_mod.steps_per_epoch(
            manifest.shards,
            world_size,
            config.data.workers,
            config.data.batch_size,
            config.seed,
            e,
        )
        steps = batches // config.grad_accum
        if config.max_steps:
            steps = min(steps, config.max_steps - total)
        if steps <= 0:
            break
        out.append(steps)
        total += steps
    if not out:
        raise cfg.ConfigError(
            f"{manifest.uri} has {manifest.num_samples} samples: too few for one step of "
            f"{world_size} ranks x {max(1, config.data.workers)} workers x batch {config.data.batch_size} "
            f"x accum {config.grad_accum}; lower the batch size or the workers"
        )
    return out


def hash_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def check_resumable(payload: dict[str, Any], config: TrainConfig, manifest, uri: str) -> None:
    """A checkpoint from another config or another I2E version is an error, not a silent mix."""
    if payload.get("kind") != TRAIN_KIND:
        raise cfg.ConfigError(
            f"{uri} is a {payload.get('kind')!r} checkpoint, not a training state"
        )
    extra = payload.get("extra", {})
    want = config.resume_signature()
    got = json.loads(extra.get("signature", "{}"))
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        raise cfg.ConfigError(
            f"{uri} was written by a different config ({', '.join(diff)} differ): "
            "use another --out, or the config it was trained with"
        )
    if extra.get("i2e_version") != manifest.version():
        raise cfg.ConfigError(
            f"{uri} was trained on I2E version {extra.get('i2e_version')}, this is {manifest.version()} "
            f"({manifest.uri}): use another --out"
        )


def preflight(config: TrainConfig, i2e_uri: str, out_uri: str) -> dict[str, Any]:
    """Every check that can fail before compute is spent (also run by `mofi train`)."""
    manifest = data_mod.load_manifest(i2e_uri, verify=True)
    world = config.dist.nproc_per_node * config.dist.nnodes
    plan = epoch_plan(config, manifest, world)
    if config.loss.uses_class and config.loss.sharded_head and manifest.num_classes < world:
        raise cfg.ConfigError(
            f"{manifest.num_classes} classes cannot be sharded over {world} ranks"
        )
    ckpts = TrainLayout(out_uri).list_checkpoints()
    if ckpts:
        check_resumable(load_checkpoint(ckpts[-1][1]), config, manifest, ckpts[-1][1])
    return {
        "manifest": manifest,
        "steps": sum(plan),
        "epochs": len(plan),
        "resume_from": ckpts[-1][0] if ckpts else 0,
    }
