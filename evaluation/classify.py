"""Zero-shot classification over class names (prompt ensemble) and a linear probe on frozen
features."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

# A few of CLIP's ImageNet templates: averaging over phrasings makes class embeddings robust.
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a close-up photo of a {}.",
    "a cartoon {}.",
    "{}.",
)


@torch.no_grad()
def class_embeddings(encode_text, names: list[str], templates=TEMPLATES) -> torch.Tensor:
    """One L2-normalised embedding per class: the mean of its normalised prompt embeddings."""
    out = []
    for name in names:
        z = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        out.append(F.normalize(z.mean(0), dim=-1))
    return torch.stack(out)


def zero_shot(
    feats: np.ndarray, labels: np.ndarray, class_names: dict[int, str], encode_text
) -> dict[str, float]:
    """Top-1/top-5 accuracy of nearest class embedding, over the images whose class is named."""
    named = sorted(c for c in set(labels.tolist()) if class_names.get(c))
    if len(named) < 2:
        return {}
    idx = {c: i for i, c in enumerate(named)}
    mask = np.array([lab in idx for lab in labels])
    emb = class_embeddings(encode_text, [class_names[c] for c in named]).cpu()
    sims = torch.from_numpy(feats[mask]).float() @ emb.T
    y = torch.tensor([idx[lab] for lab in labels[mask]])
    out = {
        "zero_shot/top1": float((sims.argmax(1) == y).float().mean()),
        "zero_shot/n_images": int(mask.sum()),
        "zero_shot/n_classes": len(named),
    }
    if len(named) >= 5:
        top5 = sims.topk(5, dim=1).indices
        out["zero_shot/top5"] = float((top5 == y[:, None]).any(1).float().mean())
    return out


def linear_probe(
    feats: np.ndarray, labels: np.ndarray, test_fraction: float = 0.5, seed: int = 0, c: float = 1.0
) -> dict[str, float]:
    """Logistic regression on standardised frozen features; per-class seeded train/test split.

    Classes with fewer than 2 images cannot be both trained and tested on and are left out.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    train, test = [], []
    for c_id in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c_id)
        if len(idx) < 2:
            continue
        idx = rng.permutation(idx)
        n_test = min(len(idx) - 1, max(1, round(len(idx) * test_fraction)))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    if len({labels[i] for i in train}) < 2:
        return {}
    scaler = StandardScaler().fit(feats[train])
    clf = LogisticRegression(C=c, max_iter=2000)
    with warnings.catch_warnings():
        # few images per class is expected here, not a sign of a regression target
        warnings.filterwarnings("ignore", message="The number of unique classes")
        clf.fit(scaler.transform(feats[train]), labels[train])
    acc = float((clf.predict(scaler.transform(feats[test])) == labels[test]).mean())
    return {
        "linear_probe/top1": acc,
        "linear_probe/n_train": len(train),
        "linear_probe/n_test": len(test),
    }
