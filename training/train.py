"""MOFI training: one process per device under torchrun (or a plain process for 1 CPU/GPU).

    torchrun --nproc-per-node 2 -m training.train --i2e I2E --config cpu_test --out RUN

(``mofi train`` builds that command from the config and checks the inputs first.)

* model: ``DualEncoder`` (image tower trained, projections to a shared embedding, text tower
  locked or trained) + a CosFace entity head, sharded over ranks (``ShardedCosFaceHead``);
* loss: ``LossConfig`` (multitask, supervised or contrastive);
* data: ``training.data`` (rank/worker split with no duplicates, exact resume);
* optimiser: AdamW, linear warmup then cosine decay; gradient accumulation; bf16 autocast on
  GPU;
* checkpoints: ``OUT/checkpoints/step_XXXXXXXX.pt``, written atomically by rank 0 every
  ``checkpoint_every`` steps and at the end; a restarted run resumes from the newest one and
  reproduces the uninterrupted run (randomness is seeded from (seed, rank, step), data order
  from (seed, epoch)); ``OUT/model.pt``: the final model for evaluation and scoring;
* logs: a progress bar, ``OUT/metrics.jsonl`` (one line per step; on s3:// published with
  every checkpoint), TensorBoard events in ``OUT/tb`` (local OUT).

Nothing here imports Airflow, Spark or pipeline_tasks.
"""

from __future__ import annotations

import os

if os.environ.get("TORCHELASTIC_RUN_ID"):  # first thing, before the slow imports below:
    from .core.process import die_with_parent  # a rank never outlives its torchrun agent

    die_with_parent()

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch

from . import data as data_mod
from . import distributed as dist_mod
from .config import TrainConfig
from .core import config as cfg
from .core import storage
from .core.device import autocast, resolve_precision
from .layout import CONFIG_FILE, METRICS_LOG, TrainLayout
from .losses import ShardedCosFaceHead, contrastive_loss, gather_shards
from .model import DualEncoder, checkpoint_state, load_checkpoint, save_checkpoint
from .modules import MofiTrainModule, param_groups
from .plan import TRAIN_KIND, check_resumable, epoch_plan, hash_seed, lr_factor
from .transforms import normalize

log = logging.getLogger("mofi.train")


class Trainer:
    def __init__(self, config: TrainConfig, i2e_uri: str, out_uri: str):
        self.config, self.i2e_uri, self.out_uri = config, i2e_uri, out_uri
        self.layout = TrainLayout(out_uri)
        self.info = dist_mod.init_distributed(config.dist.device, config.dist.timeout_s)
        self.manifest = data_mod.load_manifest(i2e_uri)
        self.plan = epoch_plan(config, self.manifest, self.info.world_size)
        self.total_steps = sum(self.plan)
        self.device = self.info.device
        # 'auto': bf16 autocast on GPU; fp32 on CPU (ask for bf16 explicitly there)
        auto_off = config.precision == "auto" and self.device.type != "cuda"
        self.amp = None if auto_off else resolve_precision(config.precision, self.device)
        lc = config.loss
        torch.manual_seed(config.seed)
        self.encoder = DualEncoder(config.model, pretrained_towers=True)
        if not lc.uses_contrast:  # unused parameters would stall DDP
            self.encoder.text_proj.requires_grad_(False)
            self.encoder.logit_scale.requires_grad_(False)
        dim = config.model.embed_dim
        n_cls = self.manifest.num_classes
        sharded = lc.sharded_head and self.info.world_size > 1
        head = None
        if lc.uses_class:
            head = ShardedCosFaceHead(
                n_cls,
                dim,
                self.info.rank if sharded else 0,
                self.info.world_size if sharded else 1,
                lc.scale,
                lc.margin,
                lc.sample_rate,
            )
            # every rank starts from the same full weight, sliced to its shard
            g = torch.Generator().manual_seed(config.seed + 1)
            head.load_full_weight(torch.randn(n_cls, dim, generator=g) / math.sqrt(dim))
        self.sharded = sharded and head is not None
        self.head = head
        self.module = MofiTrainModule(self.encoder, None if self.sharded else head).to(self.device)
        if self.sharded:
            self.head.to(self.device)
        self.ddp = dist_mod.wrap_ddp(self.module, self.info, compile_towers=config.compile)
        oc = config.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.encoder, head, oc),
            lr=oc.lr,
            betas=(oc.beta1, oc.beta2),
            eps=oc.eps,
            fused=self.device.type == "cuda",  # one kernel for every parameter's update
        )
        self.image_size = config.data.image_size or self.encoder.image_size
        self.entity_texts = self.manifest.entity_texts()
        self.text_feats = (
            self._text_features() if lc.uses_contrast and config.model.lock_text else None
        )
        self.step = 0
        self.writer = None

    # text of each class: the locked text tower runs once per entity, not once per sample
    @torch.no_grad()
    def _text_features(self) -> torch.Tensor:
        texts = self.entity_texts
        out = []
        self.encoder.text_tower.eval()
        for i in range(0, len(texts), 256):
            tok = {
                k: v.to(self.device) for k, v in self.encoder.tokenize(texts[i : i + 256]).items()
            }
            with autocast(self.device, self.amp):
                out.append(self.encoder.text_features(tok).float())
        return torch.cat(out)

    def _text_inputs(self, labels: torch.Tensor):
        if self.text_feats is not None:
            return self.text_feats[labels]
        tok = self.encoder.tokenize([self.entity_texts[i] for i in labels.tolist()])
        return {k: v.to(self.device) for k, v in tok.items()}

    # ---------------------------------------------------------- checkpoint I/O (collective)

    def _gathered_head_state(self) -> tuple[torch.Tensor | None, dict[str, Any]]:
        if self.head is None:
            return None, {}
        n = self.manifest.num_classes
        ws = self.info.world_size if self.sharded else 1
        full = gather_shards(self.head.weight.detach(), n, ws).cpu()
        st = self.optimizer.state.get(self.head.weight, {})
        opt = {}
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                opt[k] = gather_shards(st[k], n, ws).cpu()
        if "step" in st:
            opt["step"] = st["step"].cpu()
        return full, opt

    def save(self) -> None:
        head_w, head_opt = self._gathered_head_state()  # collective: every rank
        if self.info.is_main:
            opt_sd = self.optimizer.state_dict()
            head_idx = sum(len(g["params"]) for g in self.optimizer.param_groups[:-1])
            if self.head is not None:
                opt_sd["state"].pop(head_idx, None)
            state = {f"encoder.{k}": v for k, v in checkpoint_state(self.encoder, True).items()}
            if head_w is not None:
                state["head.weight"] = head_w
            uri = self.layout.checkpoint(self.step)
            save_checkpoint(
                uri,
                TRAIN_KIND,
                self.config,
                state,
                extra={
                    "step": self.step,
                    "optimizer": opt_sd,
                    "head_optimizer": head_opt,
                    "head_index": head_idx,
                    "signature": json.dumps(self.config.resume_signature(), sort_keys=True),
                    "i2e_version": self.manifest.version(),
                    "i2e_hygiene": self.manifest.info.get("hygiene"),
                    "entity_ids": self.manifest.entity_ids,
                },
            )
            for _, old in self.layout.list_checkpoints()[: -self.config.keep_checkpoints]:
                storage.delete(old)
            log.info("checkpoint %s", uri)
        dist_mod.barrier(self.info)

    def maybe_resume(self) -> None:
        ckpts = self.layout.list_checkpoints()
        if not ckpts:
            return
        step, uri = ckpts[-1]
        payload = load_checkpoint(uri, map_location="cpu")
        check_resumable(payload, self.config, self.manifest, uri)
        extra = payload["extra"]
        sd = payload["state_dict"]
        enc = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
        self.encoder.load_state_dict(enc)
        if self.head is not None:
            self.head.load_full_weight(sd["head.weight"])
        opt_sd = extra["optimizer"]
        opt_sd["state"] = {int(k): v for k, v in opt_sd["state"].items()}
        self.optimizer.load_state_dict(opt_sd)
        if self.head is not None and extra["head_optimizer"]:
            ho = extra["head_optimizer"]
            st = {}
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = ho[k][self.head.lo : self.head.hi].to(self.device).clone()
            st["step"] = ho["step"].clone()
            self.optimizer.state[self.head.weight] = st
        self.step = int(extra["step"])
        if self.info.is_main:
            log.info("resumed from %s (step %d of %d)", uri, self.step, self.total_steps)

    # ---------------------------------------------------------- the loop

    def _position(self) -> tuple[int, int]:
        """(epoch, step within epoch) of self.step."""
        s = self.step
        for e, n in enumerate(self.plan):
            if s < n:
                return e, s
            s -= n
        return len(self.plan), 0

    def _metrics_file(self) -> str:
        """Where the steps are logged: OUT/metrics.jsonl, or for an s3:// OUT a local copy
        that is published to OUT/metrics.jsonl with every checkpoint and at the end."""
        if not storage.is_s3(self.out_uri):
            return self.layout.metrics
        key = hashlib.sha1(self.out_uri.encode()).hexdigest()[:12]
        return os.path.join(tempfile.gettempdir(), "mofi-train", key, METRICS_LOG)

    def _fetch_metrics(self) -> None:
        """An s3:// OUT: start the local copy from the published log (a resumed run)."""
        if not storage.is_s3(self.out_uri):
            return
        path = self._metrics_file()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if storage.exists(self.layout.metrics):
            with open(path, "wb") as f:
                f.write(storage.read_bytes(self.layout.metrics))
        elif os.path.exists(path):
            os.remove(path)

    def _publish_metrics(self) -> None:
        path = self._metrics_file()
        if storage.is_s3(self.out_uri) and os.path.exists(path):
            storage.publish_file(path, self.layout.metrics)

    def _trim_metrics(self) -> None:
        """After a resume, drop lines for steps the resumed run will redo."""
        path = self._metrics_file()
        if not path or not os.path.exists(path):
            return
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= self.step]
        with open(path, "w") as f:
            f.writelines(lines)

    def train_step(self, batch: dict[str, Any], micro: int, accum: int) -> dict[str, float]:
        lc = self.config.loss
        images = normalize(
            batch["image"],
            self.encoder.image_mean,
            self.encoder.image_std,
            device=self.device,
            channels_last=self.device.type == "cuda",
        )
        labels = batch["label"].to(self.device)
        text = self._text_inputs(labels) if lc.uses_contrast else None
        sync = micro == accum - 1 or self.info.world_size == 1
        ctx = (
            self.ddp.no_sync()
            if not sync and hasattr(self.ddp, "no_sync")
            else contextlib.nullcontext()
        )
        out: dict[str, float] = {}
        with ctx:
            with autocast(self.device, self.amp):
                img, txt, scale = self.ddp(images, text)
            l_cls = l_con = None
            if lc.uses_class:
                head = self.head if self.sharded else self.module.head
                gen = torch.Generator(device=self.device).manual_seed(
                    self.config.seed * 1_000_003 + self.step
                )
                l_cls = head(img.float(), labels, generator=gen)
                out["loss_class"] = float(l_cls.detach())
            if lc.uses_contrast:
                l_con = contrastive_loss(
                    img.float(), txt.float(), labels, scale, self.info.rank, self.info.world_size
                )
                out["loss_contrast"] = float(l_con.detach())
            loss = lc.combine(l_cls, l_con)
            (loss / accum).backward()
        out["loss"] = float(loss.detach())
        return out

    def run(self) -> dict[str, Any]:
        c = self.config
        if self.info.is_main:
            storage.makedirs(self.out_uri)
            c.save(self.out_uri, CONFIG_FILE)
        self.maybe_resume()
        if self.info.is_main:
            self._fetch_metrics()
            self._trim_metrics()
        if self.info.is_main and c.tensorboard and not storage.is_s3(self.out_uri):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.layout.tb, purge_step=self.step + 1)
        bar = None
        if self.info.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )
        global_batch = c.data.batch_size * self.info.world_size * c.grad_accum
        t_log, n_log = time.time(), 0
        t_start = t_step = t_log
        last: dict[str, float] = {}
        self.ddp.train()
        if self.head is not None:
            self.head.train()
        while self.step < self.total_steps:
            epoch, in_epoch = self._position()
            spec = data_mod.LoaderSpec(
                shards=self.manifest.shards,
                world_size=self.info.world_size,
                rank=self.info.rank,
                batch_size=c.data.batch_size,
                image_size=self.image_size,
                seed=c.seed,
                epoch=epoch,
                steps=self.plan[epoch] * c.grad_accum,
                start_step=in_epoch * c.grad_accum,
                num_workers=c.data.workers,
                shuffle_buffer=c.data.shuffle_buffer,
                flip=c.data.flip,
            )
            loader = data_mod.make_loader(spec, c.data.start_method)
            micro = 0
            for batch in loader:
                if micro == 0:
                    torch.manual_seed(hash_seed(c.seed, self.info.rank, self.step))
                    self.optimizer.zero_grad(set_to_none=True)
                    acc: dict[str, float] = {}
                parts = self.train_step(batch, micro, c.grad_accum)
                for k, v in parts.items():
                    acc[k] = acc.get(k, 0.0) + v / c.grad_accum
                micro += 1
                if micro < c.grad_accum:
                    continue
                micro = 0
                lr = self.optimizer_step()
                n_log += 1
                acc = dist_mod.all_mean(acc, self.info)
                now = time.time()
                last = {
                    **acc,
                    "lr": lr,
                    "scale": float(self.encoder.scale().detach()),
                    "samples_per_s": global_batch / max(now - t_step, 1e-9),
                    "elapsed_s": now - t_start,
                }
                t_step = now
                if self.info.is_main:
                    self._log_step(last, bar)
                if self.step % c.log_every == 0 or self.step == self.total_steps:
                    sps = n_log * global_batch / max(now - t_log, 1e-9)  # over the interval
                    if self.info.is_main:
                        bar.set_postfix(loss=f"{acc['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{sps:.1f}")
                    t_log, n_log = now, 0
                if self.step % c.checkpoint_every == 0 or self.step == self.total_steps:
                    self.save()
                    if self.info.is_main:
                        self._publish_metrics()
                if self.step >= self.total_steps or self.step >= sum(self.plan[: epoch + 1]):
                    break
            del loader
        if bar is not None:
            bar.close()
        if self.writer:
            self.writer.close()
        result = self.export()
        if self.info.is_main:
            self._publish_metrics()
        dist_mod.barrier(self.info)
        return {**result, **last}

    def optimizer_step(self) -> float:
        """Schedule, clip, step; returns the learning rate used."""
        lr = self._apply_schedule()
        if self.config.optim.grad_clip > 0:
            sharded = list(self.head.parameters()) if self.sharded else []
            ids = {id(p) for p in sharded}
            replicated = [
                p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in ids
            ]
            dist_mod.clip_grad_norm_(replicated, sharded, self.config.optim.grad_clip, self.info)
        self.optimizer.step()
        self.step += 1
        return lr

    def _apply_schedule(self) -> float:
        oc = self.config.optim
        f = lr_factor(self.step, self.total_steps, oc.warmup_steps, oc.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = oc.lr * f * g["lr_mult"]
        return oc.lr * f

    def _log_step(self, m: dict[str, float], bar) -> None:
        bar.update(1)
        rec = {"step": self.step, **{k: round(v, 7) for k, v in m.items()}}
        path = self._metrics_file()
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.writer:
            for k, v in m.items():
                self.writer.add_scalar(f"train/{k}", v, self.step)

    def export(self) -> dict[str, Any]:
        """OUT/model.pt: a dual-encoder checkpoint (towers included) that eval and scoring load."""
        head_w, _ = self._gathered_head_state()
        uri = self.layout.model
        if self.info.is_main:
            extra = {
                "trained_steps": self.step,
                "i2e": self.i2e_uri,
                "i2e_version": self.manifest.version(),
                "i2e_hygiene": self.manifest.info.get("hygiene"),
                "entity_ids": self.manifest.entity_ids,
                "train_config": self.config.to_json(),
            }
            if head_w is not None:
                extra["entity_head"] = head_w
            save_checkpoint(
                uri, "dual_encoder", self.config.model, checkpoint_state(self.encoder, True), extra
            )
        return {"model": uri, "steps": self.step}


def main(argv: list[str] | None = None) -> int:
    from . import recipes

    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--i2e", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--config", default="cpu_test", help=f"named config: {', '.join(recipes.RECIPES)}"
    )
    p.add_argument(
        "--config-file", default="", help="a saved TrainConfig JSON (overrides --config)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = (
            TrainConfig.load(args.config_file) if args.config_file else recipes.get(args.config)
        )
        trainer = Trainer(config, args.i2e, args.out)
        result = trainer.run()
    except (cfg.ConfigError, FileNotFoundError, data_mod.DamagedShard) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist_mod.cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
