"""Writes that only one writer can win: the exclusive create and the compare-and-replace that
leases and shard claims are made of.

Local files: a temporary file hard-linked into place (``link`` fails when the name exists),
and a rename that only one taker can make. S3: conditional PUTs (``If-None-Match: *``,
``If-Match: ETAG``).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from .storage import StorageError, _s3_errors, is_s3, s3_client, split_s3
from .tempfiles import temp_name_for


def create_exclusive(uri: str, data: bytes) -> bool:
    """Publish ``data`` at ``uri`` only if nothing is there; False when something is.

    Local: the whole file is written under a temporary name, then hard-linked into place
    (``link`` fails when the name exists), so a reader sees all of it or nothing. S3: a
    conditional PUT (``If-None-Match: *``)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError

        try:
            with _s3_errors(uri):
                s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
                "412",
                "409",
            ):
                return False
            raise
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
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def replace_if_unchanged(uri: str, expected: Any, data: bytes) -> bool:
    """Replace the JSON at ``uri`` with ``data`` only if it still equals ``expected`` (taking
    over an expired lease); False when someone else changed it first."""
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
        try:
            with _s3_errors(uri):
                s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=head["ETag"])
            return True
        except StorageError:
            return False
    grave = temp_name_for(os.path.abspath(uri))
    try:
        os.rename(uri, grave)  # only one taker can move it away
    except FileNotFoundError:
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
