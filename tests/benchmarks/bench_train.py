"""Training throughput: the real trainer (I2E tars decoded by loader workers) against a bare
forward/backward/step loop of the same model on one preloaded batch, same batch size and
device, in one run (this machine is shared: only the ratio is comparable across runs).

    .venv/bin/python tests/benchmarks/bench_train.py --i2e runs/demo/i2e250 --config demo

Both loops use the trainer's own ``train_step`` and ``optimizer_step`` in one process; the
first ``--warmup`` steps of each are not timed. Target: trainer / bare >= 0.9 (the data path
is not the bottleneck). ``--flops-only`` prints a training step's FLOPs per image. On a GPU (``--device cuda``) it also prints the model FLOPs
utilisation: FLOPs of one training step measured with torch's FLOP counter (forward +
backward) x steps/s / the device's peak bf16 FLOP/s (``--peak-tflops``, 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--i2e", required=True)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-tower", default="", help="override, e.g. openclip:ViT-B-16")
    ap.add_argument("--text-tower", default="")
    ap.add_argument("--image-size", type=int, default=0)
    ap.add_argument("--precision", default="")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the towers")
    ap.add_argument(
        "--flops-only", action="store_true",
        help="print the FLOPs of one training step per image (any device) and stop",
    )  # fmt: skip
    args = ap.parse_args()

    from training import recipes
    from training.train import Trainer

    c = recipes.get(args.config)
    model = c.model
    if args.image_tower:
        model = model.replace(image_tower=args.image_tower)
    if args.text_tower:
        model = model.replace(text_tower=args.text_tower)
    data = c.data
    if args.batch_size:
        data = data.replace(batch_size=args.batch_size)
    if args.workers >= 0:
        data = data.replace(workers=args.workers)
    if args.image_size:
        data = data.replace(image_size=args.image_size)
    c = c.replace(
        model=model,
        data=data,
        dist=c.dist.replace(nproc_per_node=1, device=args.device),
        max_steps=args.steps,
        checkpoint_every=10**9,
        tensorboard=False,
        log_every=10**9,
        precision=args.precision or c.precision,
        compile=args.compile or c.compile,
    )
    work = tempfile.mkdtemp(prefix="mofi-bench-train-")
    try:
        # the bare loop runs before and after the trainer, and the trainer is compared with
        # their mean, so drift of the shared machine does not favour either side
        bare = Trainer(c, args.i2e, os.path.join(work, "bare"))
        bare.ddp.train()
        spec_batch = next(iter(_loader(bare, c)))
        if args.flops_only:
            flops = _step_flops(bare, spec_batch)
            print(
                f"{c.model.image_tower} / {c.model.text_tower}, {bare.image_size}px: "
                f"{flops / c.data.batch_size / 1e9:.1f} GFLOP per image per training step "
                f"(forward + backward, torch's FLOP counter, batch {c.data.batch_size})"
            )
            return 0
        n = args.steps - args.warmup
        bare_runs = [_bare_loop(bare, spec_batch, args.steps, args.warmup) * c.data.batch_size]

        # the trainer, as `mofi train` runs it (one process)
        tr = Trainer(c, args.i2e, os.path.join(work, "run"))
        tr.run()
        with open(os.path.join(work, "run", "metrics.jsonl")) as f:
            rec = [json.loads(line) for line in f]
        t = {r["step"]: r["elapsed_s"] for r in rec}
        real_sps = n * c.data.batch_size / (t[args.steps] - t[args.warmup])

        bare_runs.append(_bare_loop(bare, spec_batch, args.steps, args.warmup) * c.data.batch_size)
        bare_sps = sum(bare_runs) / len(bare_runs)
        print(
            f"config {c.name}: {c.model.image_tower} / {c.model.text_tower}, batch {c.data.batch_size}, "
            f"{c.data.workers} loader worker(s), image {tr.image_size}px, device {bare.device}, "
            f"{torch.get_num_threads()} torch threads"
        )
        print(f"trainer (I2E tars, decode in loader workers): {real_sps:8.2f} samples/s")
        print(
            f"bare loop (preloaded batch):                  {bare_sps:8.2f} samples/s "
            f"(before {bare_runs[0]:.2f}, after {bare_runs[1]:.2f})"
        )
        print(f"ratio trainer / bare: {real_sps / bare_sps:.3f}  (target >= 0.9)")
        if bare.device.type == "cuda":
            flops = _step_flops(bare, spec_batch)
            mfu = flops * bare_sps / c.data.batch_size / (args.peak_tflops * 1e12)
            mfu_real = flops * real_sps / c.data.batch_size / (args.peak_tflops * 1e12)
            print(
                f"FLOPs per step: {flops / 1e12:.3f} TFLOP; MFU bare {mfu:.3f}, trainer {mfu_real:.3f} "
                f"(peak {args.peak_tflops} TFLOP/s)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _bare_loop(trainer, batch, steps: int, warmup: int) -> float:
    """Steps/s of train_step + optimizer_step on one preloaded batch."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for i in range(steps):
        if i == warmup:
            sync()
            t0 = time.time()
        torch.manual_seed(i)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.train_step(batch, 0, 1)
        trainer.optimizer_step()
    sync()
    return (steps - warmup) / (time.time() - t0)


def _loader(trainer, c):
    from training import data as data_mod

    spec = data_mod.LoaderSpec(
        shards=trainer.manifest.shards,
        world_size=1,
        rank=0,
        batch_size=c.data.batch_size,
        image_size=trainer.image_size,
        seed=c.seed,
        epoch=0,
        steps=1,
        num_workers=0,
        shuffle_buffer=c.data.shuffle_buffer,
    )
    return data_mod.make_loader(spec)


def _step_flops(trainer, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    trainer.optimizer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fc:
        trainer.train_step(batch, 0, 1)
    return float(fc.get_total_flops())


if __name__ == "__main__":
    sys.exit(main())
