"""The runs under the dashboard's roots: which folders hold stage markers and training logs.

A *run* is what one row of the page shows:

* every Hive-style partition folder below a root (``ROOT/v=2026-11-23``, as the Airflow DAGs
  write them) is a run of its own, named ``LABEL/v=2026-11-23``;
* whatever lies outside partitions (``runs/demo/i2e_run/ner``, ``runs/demo/train``) belongs
  to the run of the root itself, named ``LABEL``.

``LABEL`` is the root's last path component (made unique with ``~2``, ``~3`` when two roots
end alike). Stage roots are found by :meth:`status.MarkerReader.find_stage_roots` (a cached,
paginated listing on S3) and training runs by their ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import os
import re

from training.core import storage
from training.layout import METRICS_LOG

from ..runtime import status

PARTITION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^/]+$")


@dataclasses.dataclass
class Run:
    """One run: its stage roots and training folders, each with its path inside the run."""

    id: str
    uri: str
    root: str
    stage_roots: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    training: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def root_labels(roots: tuple[str, ...]) -> dict[str, str]:
    """root URI -> a short unique label (its last path component)."""
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    for r in roots:
        if storage.is_s3(r):
            base = r.rstrip("/").rsplit("/", 1)[-1]
        else:
            base = os.path.basename(os.path.abspath(r))
        base = base or "root"
        seen[base] = seen.get(base, 0) + 1
        out[r] = base if seen[base] == 1 else f"{base}~{seen[base]}"
    return out


def _split(rel: str) -> tuple[str, str]:
    """``v=1/i2e_run/ner`` -> (``v=1``, ``i2e_run/ner``): the shallowest partition folder and
    the path inside it; ("", rel) when no component is a partition."""
    parts = [] if rel in ("", ".") else rel.split("/")
    for i, p in enumerate(parts):
        if PARTITION.match(p):
            return "/".join(parts[: i + 1]), "/".join(parts[i + 1 :]) or "."
    return "", rel or "."


def _local_training(base: str) -> list[str]:
    """Folders (relative to ``base``) holding a metrics log, walked as status walks for
    markers: hidden and ``_`` folders and the bulky ones (checkpoints, tb, ...) skipped."""
    found = []
    for d, dirs, files in os.walk(base):
        depth = d[len(base) :].count(os.sep)
        if METRICS_LOG in files:
            found.append(os.path.relpath(d, base))
        dirs[:] = [
            x
            for x in sorted(dirs)
            if depth < status.MAX_DEPTH
            and not x.startswith((".", "_"))
            and x not in status.SKIP_DIRS
        ]
    return found


def _s3_training(reader: status.MarkerReader, uri: str) -> list[str]:
    """Folders holding a metrics log, from the same delimited walk status makes for stage
    roots (``MarkerReader.walk_s3``: no listing grows with the shard files)."""
    return sorted(rel for rel, _dirs, files in reader.walk_s3(uri) if METRICS_LOG in files)


def find_runs(reader: status.MarkerReader, root: str, label: str) -> list[Run]:
    """Every run under ``root`` (see the module doc); FileNotFoundError when it is missing."""
    if not storage.is_s3(root) and not os.path.isdir(root):
        raise FileNotFoundError(f"root not found: {root}")
    stage_roots = reader.find_stage_roots(root)
    training = (
        _s3_training(reader, root)
        if storage.is_s3(root)
        else _local_training(os.path.abspath(root))
    )
    runs: dict[str, Run] = {}

    def run_for(part: str) -> Run:
        if part not in runs:
            runs[part] = Run(
                id=f"{label}/{part}" if part else label,
                uri=storage.join(root, part) if part else root,
                root=root,
            )
        return runs[part]

    for rel, uri in stage_roots:
        part, where = _split(rel)
        run_for(part).stage_roots.append((where, uri))
    for rel in training:
        part, where = _split(rel)
        run_for(part).training.append((where, storage.join(root, rel) if rel != "." else root))
    if not runs:  # an empty root is still shown (nothing has run there yet)
        run_for("")
    return [runs[k] for k in sorted(runs)]
