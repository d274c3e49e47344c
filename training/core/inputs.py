"""Checks of the files a command reads, made before any work: a damaged input is one line
naming the file and what is wrong (:class:`InputError`, the CLI's exit 2), never a reader's
traceback from deep inside a stage.

Each check reads as little as it can: a Parquet footer (the schema), a tar's first header and
its end-of-archive blocks, a JSON document. On S3 those are ranged reads.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any

from . import storage

TAR_BLOCK = 512


class InputError(ValueError):
    """An input file that is missing, empty, truncated, not its format or of the wrong shape."""


def _size(uri: str, what: str) -> int:
    try:
        n = storage.size(uri)
    except FileNotFoundError:
        raise InputError(f"{what} {uri} is missing") from None
    if n == 0:
        raise InputError(f"{what} {uri} is empty (0 bytes)")
    return n


def check_parquet(uri: str, columns: Sequence[str] = (), what: str = "Parquet file"):
    """The file's Arrow schema; InputError unless it is a whole Parquet file with ``columns``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = _size(uri, what)
    tail = storage.read_range(uri, max(0, n - 8), 8)
    footer_len = int.from_bytes(tail[:4], "little") if len(tail) == 8 else 0
    if n < 12 or tail[-4:] != b"PAR1" or not 0 < footer_len <= n - 12:
        raise InputError(f"{what} {uri} is not Parquet or is truncated (no Parquet footer)")
    footer = storage.read_range(uri, n - 8 - footer_len, footer_len + 8)
    try:  # the footer alone, behind a magic: pyarrow reads only the metadata
        schema = pq.read_schema(pa.BufferReader(b"PAR1" + footer))
    except (pa.ArrowException, OSError, ValueError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise InputError(f"{what} {uri} is a damaged Parquet file: {msg}") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(f"{what} {uri} lacks column(s) {missing} (has {schema.names[:12]})")
    return schema


def check_tar(uri: str, what: str = "tar shard") -> None:
    """InputError unless ``uri`` is a tar archive that ends with its end-of-archive blocks
    (a truncated download lacks them)."""
    n = _size(uri, what)
    head = storage.read_range(uri, 0, TAR_BLOCK)
    if head.strip(b"\0"):
        try:
            tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
        except tarfile.TarError:
            raise InputError(f"{what} {uri} is not a tar archive") from None
    if n % TAR_BLOCK:
        raise InputError(f"{what} {uri} is truncated ({n} bytes, not whole 512-byte blocks)")
    if n < 2 * TAR_BLOCK or storage.read_range(uri, n - 2 * TAR_BLOCK, 2 * TAR_BLOCK).strip(b"\0"):
        raise InputError(f"{what} {uri} is truncated (no end-of-archive blocks)")


def check_json(uri: str, what: str = "JSON file") -> Any:
    """The parsed document; InputError when missing, empty, truncated or not JSON."""
    _size(uri, what)
    text = storage.read_bytes(uri)
    try:
        return json.loads(text)
    except UnicodeDecodeError:
        raise InputError(f"{what} {uri} is not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise InputError(f"{what} {uri} is not valid JSON ({exc.msg} at {where})") from None


def check_all(checks: Iterable[tuple], workers: int = 16) -> None:
    """Run ``(fn, *args)`` checks in threads (S3 round trips overlap); the first failure in
    input order is raised."""
    from concurrent.futures import ThreadPoolExecutor

    checks = list(checks)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(checks)))) as pool:
        futures = [pool.submit(fn, *args) for fn, *args in checks]
    for fut in futures:
        fut.result()
