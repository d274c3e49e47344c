"""Writes that only one writer can win: the exclusive create and the compare-and-replace that
leases and shard claims are made of.

Local files: a temporary file hard-linked into place (``link`` fails when the name exists),
and a rename that only one taker can make. S3: conditional PUTs (``If-None-Match: *``,
``If-Match: ETAG``).

The lost answer: a server can apply a write and the answer never arrive (a dropped
connection; boto3 then retries and the retry is refused, 412, because the first one landed;
over NFS a ``link`` or ``rename`` can report failure after it succeeded). So every write
here carries its owner's token in ``data`` (leases and claims put one in their record), and
after a refusal or an unknown outcome the writer reads the object back: its own bytes there
mean it won.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

from .storage import StorageError, _s3_errors, is_s3, read_bytes, s3_client, split_s3
from .tempfiles import temp_name_for

log = logging.getLogger(__name__)
_REFUSED = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _refused(exc: StorageError) -> bool:
    from botocore.exceptions import ClientError

    cause = exc.__cause__
    return isinstance(cause, ClientError) and (
        cause.response.get("Error", {}).get("Code") in _REFUSED
    )


def _ours(uri: str, data: bytes) -> bool:
    """After a refusal or an unknown outcome: is what ``uri`` holds our own write?"""
    try:
        mine = read_bytes(uri) == data
    except (FileNotFoundError, StorageError):
        return False
    if mine:
        log.warning("%s: our write landed though its answer was lost; it is ours", uri)
    return mine


def _conditional_put(uri: str, data: bytes, **condition: str) -> bool:
    """One conditional PUT (``IfNoneMatch`` or ``IfMatch``): True when it landed, also when
    its answer was lost (our bytes read back); False when refused; else the error."""
    bucket, key = split_s3(uri)
    try:
        with _s3_errors(uri):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
        return True
    except StorageError as exc:
        if _ours(uri, data):
            return True
        if _refused(exc):
            return False
        raise


def create_exclusive(uri: str, data: bytes) -> bool:
    """Publish ``data`` at ``uri`` only if nothing is there; False when something is.

    Local: the whole file is written under a temporary name, then hard-linked into place
    (``link`` fails when the name exists), so a reader sees all of it or nothing. S3: a
    conditional PUT (``If-None-Match: *``). ``data`` must be unique to this writer (a
    token in it): a refusal is read back, and our own bytes there are a win."""
    if is_s3(uri):
        return _conditional_put(uri, data, IfNoneMatch="*")
    parent = os.path.dirname(os.path.abspath(uri))
    os.makedirs(parent, exist_ok=True)
    tmp = temp_name_for(os.path.abspath(uri))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, uri)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            if os.path.samefile(tmp, uri):  # the link was made; its answer was not
                return True
        if os.path.exists(uri):
            return False
        raise
    finally:
        os.remove(tmp)


def replace_if_unchanged(uri: str, expected: Any, data: bytes) -> bool:
    """Replace the JSON at ``uri`` with ``data`` only if it still equals ``expected`` (taking
    over an expired lease); False when someone else changed it first. ``data`` carries the
    writer's token, as for :func:`create_exclusive`."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            with _s3_errors(uri):
                head = s3_client().get_object(Bucket=bucket, Key=key)
                current = json.loads(head["Body"].read())
        except FileNotFoundError:
            return create_exclusive(uri, data)
        if current != expected:
            return False
        return _conditional_put(uri, data, IfMatch=head["ETag"])
    grave = temp_name_for(os.path.abspath(uri))
    try:
        os.rename(uri, grave)  # only one taker can move it away
    except FileNotFoundError:
        if not os.path.exists(grave):  # (over NFS the rename may have happened anyway)
            return create_exclusive(uri, data)
    try:
        with open(grave, "rb") as f:
            current = json.loads(f.read() or b"null")
    except ValueError:
        current = None
    if current != expected:  # it changed under us: put it back, we did not take it
        with contextlib.suppress(FileExistsError):
            os.link(grave, uri)
        os.remove(grave)
        return False
    os.remove(grave)
    return create_exclusive(uri, data)
