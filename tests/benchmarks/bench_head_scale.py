"""The sharded entity head (Partial FC) at the paper's scale: 1,000,000 classes on 2 CPU ranks
(gloo), 2,000,000 on a GPU (``--device cuda``), with and without class sampling, against a
10,000-class head.

    .venv/bin/python tests/benchmarks/bench_head_scale.py                       # CPU, 2 ranks
    .venv/bin/python tests/benchmarks/bench_head_scale.py --device cuda --ranks 1 --classes 10000,2000000

Each configuration runs in fresh processes: the head with its AdamW state on every rank,
features of the global batch as a tower would give them, forward + backward + step. Printed
per rank: the bytes of the head's weight and optimizer state (target: about 1 / world_size of
the unsharded head's), the process's peak RSS (CUDA: peak allocated), and the step time,
also as a ratio to the 10,000-class head's.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
GIB = 1 << 30


def _rank(rank: int, ws: int, port: int, args, classes: int, rate: float, q) -> None:
    from training.core.device import peak_rss_bytes
    from training.losses import ShardedCosFaceHead

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // ws))
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank, world_size=ws)
    torch.manual_seed(rank)
    head = ShardedCosFaceHead(classes, args.dim, rank, ws, sample_rate=rate).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(7 + rank)
    times = []
    for step in range(args.steps):
        x = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
        y = torch.randint(0, classes, (args.batch,), device=device, generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = head(x, y, generator=torch.Generator(device=device).manual_seed(step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    state = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    weight = head.weight.numel() * head.weight.element_size()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    warm = times[args.warmup :]
    q.put(
        {
            "rank": rank,
            "weight": weight,
            "opt": state,
            "peak": peak,
            "step_s": sum(warm) / len(warm),
            "loss": float(loss.detach()),
        }
    )
    dist.destroy_process_group()


def run(args, classes: int, rate: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_rank, args=(r, args.ranks, port, args, classes, rate, q))
        for r in range(args.ranks)
    ]
    for p in procs:
        p.start()
    out = [q.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    return {
        "weight_opt": max(r["weight"] + r["opt"] for r in out),
        "peak": max(r["peak"] for r in out),
        "step_s": max(r["step_s"] for r in out),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--classes", default="10000,1000000")
    ap.add_argument("--rates", default="1.0,0.1", help="class sampling rates (1.0: all classes)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="per rank")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    classes = [int(c) for c in args.classes.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    print(f"{args.ranks} rank(s) on {args.device}, dim {args.dim}, batch {args.batch} per rank")
    print(
        f"{'classes':>10} {'sampling':>8} {'head+AdamW/rank':>16} {'unsharded':>10} {'ratio':>6} {'peak/rank':>10} {'step s':>8} {'vs 10k':>7}"
    )
    base: dict[float, float] = {}
    for n in classes:
        for rate in rates:
            r = run(args, n, rate)
            unsharded = n * args.dim * 4 * 3  # fp32 weight + AdamW's two moments
            if n == classes[0]:
                base[rate] = r["step_s"]
            print(
                f"{n:>10,} {rate:>8.2f} {r['weight_opt'] / GIB:>14.3f} G {unsharded / GIB:>8.3f} G "
                f"{r['weight_opt'] / unsharded:>6.3f} {r['peak'] / GIB:>8.2f} G {r['step_s']:>8.3f} "
                f"{r['step_s'] / base[rate]:>7.1f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
