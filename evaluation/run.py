"""`mofi eval`: features of an image folder -> GPR1200 mAP (+ per domain), zero-shot, linear
probe -> metrics JSON, results store, optional Pushgateway."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch

from training.core import config as cfg
from training.core import storage
from training.core.device import autocast, pick_device, resolve_precision
from training.layout import TrainLayout

from . import classify, images, results
from .layout import folder_name
from .models import load_eval_model
from .retrieval import GPR1200_DOMAINS, retrieval_map

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalConfig(cfg.StageConfig):
    """How a model is evaluated on an image folder."""

    preprocess: str = cfg.field(
        "model", "model (the model's own transform) or mofi (MOFI's released eval)"
    )
    domains: str = cfg.field(
        "auto", "auto (GPR1200 blocks when the folder looks like GPR1200), gpr1200 or none"
    )
    k: int = cfg.field(0, "also report GPR1200's mAP@k (0: off)")
    zero_shot: bool = cfg.field(
        True, "zero-shot accuracy when the model has a text tower and classes are named"
    )
    linear_probe: bool = cfg.field(True, "logistic-regression probe on the frozen features")
    batch_size: int = cfg.field(64, "images per forward pass")
    workers: int = cfg.field(2, "decode processes")
    device: str = cfg.field("auto", "auto, cpu or cuda[:N]")
    precision: str = cfg.field("auto", "autocast: auto (bf16 on GPU), fp32, bf16")

    def validate(self) -> None:
        self._check(self.preprocess in images.PREPROCESS, "preprocess", "model or mofi")
        self._check(self.domains in ("auto", "gpr1200", "none"), "domains", "auto, gpr1200 or none")
        self._check(self.k >= 0, "k", "must be >= 0")
        self._check(self.batch_size >= 1, "batch_size", "must be >= 1")


def _domains(kind: str, labels: list[int]):
    if kind == "gpr1200" or (kind == "auto" and max(labels) < 1200 and len(set(labels)) >= 1000):
        return GPR1200_DOMAINS
    return None


@torch.no_grad()
def extract_features(
    model, folder: images.EvalFolder, c: EvalConfig, device, progress: bool = True
):
    """(features (n, d) float32 of the readable images, their indices, unreadable indices)."""
    pre = images.make_preprocess(c.preprocess, model.image_size, model.mean, model.std)
    ds = images.FolderImages(folder.files, pre)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=c.batch_size,
        num_workers=c.workers,
        collate_fn=images.collate,
        multiprocessing_context="spawn" if c.workers else None,
    )
    amp = (
        None
        if (c.precision == "auto" and device.type != "cuda")
        else resolve_precision(c.precision, device)
    )
    feats, keep, bad = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ds), desc="eval features", unit="img", dynamic_ncols=True)
    for x, idx, b in loader:
        bad.extend(b)
        if x is not None:
            with autocast(device, amp):
                z = model.encode_image(x.to(device))
            feats.append(torch.nn.functional.normalize(z.float(), dim=-1).cpu())
            keep.extend(idx)
        if bar:
            bar.update(len(idx) + len(b))
    if bar:
        bar.close()
    if not feats:
        raise cfg.ConfigError(f"no readable image in {folder.uri}")
    return torch.cat(feats).numpy(), np.asarray(keep), bad


def query_mask(labels: np.ndarray, images_uri: str) -> tuple[dict[Any, int], np.ndarray]:
    """(images per class, which images query). A class with one image would find itself first
    (AP 1): it stays in the gallery as a distractor but is not averaged as a query."""
    counts = {lab: int(n) for lab, n in zip(*np.unique(labels, return_counts=True), strict=True)}
    is_query = np.array([counts[lab] > 1 for lab in labels])
    if not is_query.any():
        raise cfg.ConfigError(
            f"{images_uri}: every class has a single image; retrieval needs pairs"
        )
    return counts, is_query


def run_eval(
    model_spec: str,
    images_uri: str,
    out_uri: str | None,
    c: EvalConfig,
    run_id: str = "",
    results_url: str | None = None,
    push_url: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    t0 = time.time()
    folder = images.read_folder(images_uri)  # naming errors before any model is loaded
    device = pick_device(c.device)
    model = load_eval_model(model_spec, device)
    if out_uri is None:
        if model.kind != "mofi":
            raise cfg.ConfigError("--out is needed for models that are not our checkpoints")
        ckpt = model.info["checkpoint"]
        out_uri = TrainLayout.of_model(ckpt).eval_metrics(
            storage.basename(ckpt).rsplit(".", 1)[0], folder_name(images_uri)
        )
    t1 = time.time()
    feats, keep, bad = extract_features(model, folder, c, device, progress)
    t2 = time.time()
    labels = np.asarray(folder.labels)[keep]
    counts, is_query = query_mask(labels, images_uri)
    singletons = sorted(lab for lab, n in counts.items() if n == 1)
    domains = _domains(c.domains, labels.tolist())
    metrics: dict[str, Any] = retrieval_map(
        feats, labels, domains=domains, device=device, is_query=is_query
    ).metrics()
    if c.k:
        metrics.update(
            retrieval_map(feats, labels, k=c.k, device=device, is_query=is_query).metrics()
        )
    t3 = time.time()
    if c.zero_shot and model.encode_text is not None and folder.class_names:
        with torch.no_grad():
            metrics.update(classify.zero_shot(feats, labels, folder.class_names, model.encode_text))
    if c.linear_probe:
        metrics.update(classify.linear_probe(feats, labels))
    report = {
        "model": model.name,
        "model_spec": model_spec,
        "model_info": model.info,
        "images": images_uri,
        "n_images": int(len(keep)),
        "n_queries": int(is_query.sum()),
        "n_classes": len(counts),
        "skipped": {**folder.skipped, **({"unreadable": len(bad)} if bad else {})},
        "unreadable_files": [folder.files[i] for i in bad][:20],
        "singleton_classes": len(singletons),
        "preprocess": c.preprocess,
        "config": c.to_dict(),
        "metrics": metrics,
        "timing_s": {
            "load": round(t1 - t0, 2),
            "features": round(t2 - t1, 2),
            "map": round(t3 - t2, 3),
            "total": round(time.time() - t0, 2),
        },
        "run_id": run_id or model.name,
        "i2e_version": model.info.get("i2e_version", ""),
        "i2e_hygiene": model.info.get("i2e_hygiene"),
    }
    storage.write_json(out_uri, report)
    report["metrics_uri"] = out_uri
    if results_url != "":
        url = results_url or results.default_url()
        report["result_id"] = results.append_result(
            url,
            {
                "run_id": report["run_id"],
                "model": model.name,
                "images": images_uri,
                "i2e_version": report["i2e_version"],
                "config": {"eval": c.to_dict(), "model": model.info},
                "metrics": metrics,
            },
        )
        report["results_url"] = url
    if push_url:
        results.push_metrics(
            push_url,
            "mofi_eval",
            report["run_id"],
            metrics,
            {"model": model.name, "images": folder_name(images_uri)},
        )
    return report
