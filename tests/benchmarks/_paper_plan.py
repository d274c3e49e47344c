"""The paper-scale plan (1.1B pairs, 2M entities) computed from measured inputs.

``plan(result, storage, map_result, train_flops)`` takes what `bench_scale.py` measured (its
result dict and the storage of its largest growth run), the result of `bench_map_size.py`
(or None) and the FLOPs per training image of `bench_train.py --flops-only`, and returns
rows of (what, figure, input and the command that measured it). Figures that need a GPU
measurement are computed from the issue's target and marked so.
"""

from __future__ import annotations

import math

PAIRS = 1_100_000_000
ENTITIES = 2_000_000
SHARD = 10_000  # pairs per raw shard (img2dataset's default; the production recipe's write)
STAGES = 5  # marker stages of a build (bench_bookkeeping's layout)
WINDOW_H = 24.0  # a full weekly rebuild finishes within a day
CPU_SHARE = 0.8  # of that day for the Spark and write stages; scoring gets the rest
GPU_SCORE_RATE = 10_000.0  # images/s per H200, issue 24's target (not yet measured)
GPU_DECODE_BOUND = 12_000.0  # DESIGN.md: batched nvJPEG decode + resize, one H200 process
PEAK_TFLOPS = 989.0  # bf16 dense, H100/H200 SXM
MFU = 0.35  # issue 24's target (not yet measured)
MEAN_JPEG = 10.5 * 1024  # DESIGN.md: mean JPEG of 224-512 px web images (GPU host test set)
EPOCHS = 10  # the b16_8gpu recipe's schedule

BENCH = "make bench-scale"
MAP = "make bench-map"
TRAIN = "bench_train.py --config b16_8gpu --flops-only"


def _marginal(seconds: dict, pairs: list[int]) -> tuple[float, str]:
    """Wall seconds per extra pair between the two largest sizes (fixed start-ups cancel),
    and how it was read. When the extra pairs cost less than this machine's noise (the
    larger run no slower), the largest run's whole wall time per pair bounds it instead."""
    a, b = sorted(pairs)[-2:]
    m = (seconds[str(b)] - seconds[str(a)]) / (b - a)
    if m > 0:
        return m, f"marginal {a:,} -> {b:,}"
    return seconds[str(b)] / b, f"at most: {b:,} pairs' whole run, the marginal is below noise"


def _tb(n: float) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:,.1f} GB"


def plan(
    result: dict,
    storage: dict,
    map_result: dict | None,
    train_flops: float | None,
    cores: int,
) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    cpu_h: dict[str, float] = {}
    gpu_h = 0.0
    shards = math.ceil(PAIRS / SHARD)
    rows.append(("raw shards", f"{shards:,} of {SHARD:,} pairs", "1.1B / 10,000"))
    markers = shards * STAGES
    bk = result.get("bookkeeping", {}).get("local", {})
    rows.append(
        (
            "markers",
            f"{markers:,}; warm `mofi status` {bk.get('status_warm_s', float('nan')):.2f} s "
            f"at {bk.get('markers', 0):,}",
            BENCH + " (bookkeeping)",
        )
    )
    from pipeline_tasks.orchestration.dag_tasks import MAX_MAP

    if map_result:
        batch = max(map_result["batch"]["batch"], math.ceil(shards / MAX_MAP))
        per = map_result["rows"][-1]
        rows.append(
            (
                "mapped scoring tasks",
                f"{math.ceil(shards / batch):,} of {batch} shards (Airflow "
                f"{per['fanout_s_per_task']:.2f} s and {per['db_bytes_per_task'] / 1024:.0f} KiB "
                f"of metadata DB per task at {per['tasks']:,} mapped)",
                MAP,
            )
        )
    else:
        n = min(MAX_MAP, shards)
        rows.append(("mapped scoring tasks", f"{n:,} (cap)", f"{MAP} not run"))
    # storage per stage, bytes per pair of the largest growth run
    per_pair = storage["bytes_per_pair"]
    for stage in ("ner", "score", "score_embeddings", "vocab", "labels"):
        if stage in per_pair:
            rows.append(
                (
                    f"storage: {stage}",
                    _tb(per_pair[stage] * PAIRS),
                    f"{per_pair[stage]:,.0f} B/pair, {BENCH} (storage)",
                )
            )
    ratio = storage.get("i2e_over_raw")
    if ratio:
        rows.append(
            (
                "storage: raw images / I2E shards",
                f"{_tb(MEAN_JPEG * PAIRS)} / {_tb(MEAN_JPEG * PAIRS * ratio)}",
                f"{MEAN_JPEG / 1024:.1f} KiB mean JPEG (DESIGN.md), I2E / raw {ratio:.2f} "
                f"({BENCH})",
            )
        )
    ent = storage.get("entity_cache_bytes_per_entity")
    if ent:
        rows.append(
            (
                "storage: entity embedding cache",
                f"{ent * ENTITIES / 1e9:,.1f} GB",
                f"{ent:,.0f} B/entity ({BENCH})",
            )
        )
    # Spark core-hours
    e2m = result.get("entities", {}).get(str(ENTITIES)) or result.get("entities", {}).get(
        ENTITIES, {}
    )
    if e2m:
        link, window = e2m["spark_per_core_linking"], e2m["spark_per_core_window"]
        lo, hi = PAIRS / link / 3600, PAIRS / window / 3600
        cpu_h["ner"] = hi
        rows.append(
            (
                "NER core-hours (Spark)",
                f"{lo:,.0f} (linking alone) to {hi:,.0f} (task window)",
                f"{link:,.0f} / {window:,.0f} captions/s per core at 2M entities ({BENCH})",
            )
        )
    g = result.get("growth", {})
    pairs = sorted(int(p) for p in g.get("vocab", {}).get("seconds", {}))
    if len(pairs) >= 2:
        per, how = _marginal(g["vocab"]["seconds"], pairs)
        core_s = per * cores
        ch = cpu_h["vocab"] = PAIRS * core_s / 3600
        rows.append(
            (
                "vocab core-hours (Spark)",
                f"{ch:,.0f}",
                f"{core_s * 1e3:.2f} core-ms per pair, {how} ({BENCH})",
            )
        )
        cpu_s, _ = _marginal(g["score"]["seconds"], pairs)
        gpu_h = PAIRS / GPU_SCORE_RATE / 3600
        rows.append(
            (
                "scoring GPU-hours (awaits a GPU)",
                f"{gpu_h:,.0f} at {GPU_SCORE_RATE:,.0f} images/s per H200 (issue 24's target; "
                f"decode bound {GPU_DECODE_BOUND:,.0f})",
                f"the score stage on CPU here: {1 / cpu_s:,.0f} pairs/s on {cores} cores "
                f"({BENCH}); GPU rates: DESIGN.md",
            )
        )
        per, how = _marginal(g["write"]["seconds"], pairs)
        wr = per * cores
        cpu_h["write"] = PAIRS * wr / 3600
        rows.append(
            (
                "write core-hours",
                f"{cpu_h['write']:,.0f}",
                f"{wr * 1e3:.2f} core-ms per pair, {how} ({BENCH}); I/O bound at scale",
            )
        )
    if cpu_h and gpu_h:
        cpu_total = sum(cpu_h.values())
        cores_needed = math.ceil(cpu_total / (WINDOW_H * CPU_SHARE))
        gpus = math.ceil(gpu_h / (WINDOW_H * (1 - CPU_SHARE)))
        rows.append(
            (
                "the weekly rebuild cluster",
                f"{cores_needed:,} Spark cores and {gpus} scoring GPUs rebuild everything in "
                f"{WINDOW_H:.0f} h ({cpu_total:,.0f} core-hours of ner, vocab and write in "
                f"{WINDOW_H * CPU_SHARE:.0f} h, {gpu_h:,.0f} GPU-hours of scoring in "
                f"{WINDOW_H * (1 - CPU_SHARE):.1f} h); a week that adds N new shards costs "
                f"N / {shards:,} of it (reuse_from)",
                "the rows above",
            )
        )
    if train_flops:
        per_epoch = PAIRS * train_flops / (PEAK_TFLOPS * 1e12 * MFU) / 3600
        rows.append(
            (
                "training GPU-hours (awaits a GPU)",
                f"{per_epoch:,.0f} per epoch over 1.1B, {per_epoch * EPOCHS:,.0f} for the "
                f"b16_8gpu recipe's {EPOCHS} epochs ({per_epoch * EPOCHS / 64 / 24:,.1f} days "
                f"on 8 nodes x 8 GPUs) at MFU {MFU} (issue 24's target)",
                f"{train_flops / 1e9:.1f} GFLOP per image per step ({TRAIN})",
            )
        )
    return rows


def render(rows: list[tuple[str, str, str]]) -> str:
    out = ["| what | at 1.1B pairs, 2M entities | measured input |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)
