"""What a done marker vouches for, and the one check of it.

A stage's done marker (``ROOT/_markers/STAGE/SHARD.done.json``, written by
``pipeline_tasks.runtime.markers``) records each file the shard published under
``stats.outputs``: its name relative to ``ROOT``, its size and sha256. Everything that trusts
a done marker checks it with :func:`outputs_problem`: the stages (before skipping a shard),
``mofi status`` and the dashboard, and the training loader (each I2E tar against the write
stage's marker).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import storage

MARKER_DIR = "_markers"


def marker_uri(root: str, stage: str, shard: str, state: str) -> str:
    """``ROOT/_markers/STAGE/SHARD.STATE.json``."""
    return storage.join(root, MARKER_DIR, stage, f"{shard}.{state}.json")


def output_uri(root: str, name: str) -> str:
    """The URI of an output a marker under ``root`` records as ``name``."""
    return name if storage.is_s3(name) or name.startswith("/") else storage.join(root, name)


def outputs_problem(
    root: str,
    outputs: Mapping[str, Mapping[str, Any]],
    sizes: Mapping[str, int] | None = None,
    size_of: Callable[[str], int] | None = storage.size,
    deep: bool = False,
    marker: str = "done marker",
) -> str | None:
    """None when every recorded output is on storage with its recorded size (``deep``: and
    its sha256), else what is wrong. ``sizes`` (URI -> bytes, from one listing per folder)
    answers first; an output it lacks is looked up with ``size_of`` (None: it is missing)."""
    for name, want in outputs.items():
        uri = output_uri(root, name)
        if sizes is not None and uri in sizes:
            got = sizes[uri]
        elif size_of is None:
            return f"{name} is missing"
        else:
            try:
                got = size_of(uri)
            except FileNotFoundError:
                return f"{name} is missing"
        if got != want.get("size"):
            return f"{name} has {got} bytes, its {marker} recorded {want.get('size')}"
        if deep and storage.sha256(uri) != want.get("sha256"):
            return f"{name} does not match the sha256 its {marker} recorded"
    return None
