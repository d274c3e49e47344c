"""One small storage API over local paths and ``s3://`` URIs.

Every stage reads URIs and writes URIs. Writers publish atomically: a local file is
written under a hidden temporary name in the destination directory and renamed into
place; an S3 object only becomes visible when its single PUT or its multipart upload
completes, and an aborted write aborts the upload. Listings never show temporary
names, so a reader can never see half a shard.

S3 settings come from boto3's usual sources (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for MinIO/Ceph/moto, ...), retries too: boto3's ``standard`` mode unless
``AWS_RETRY_MODE`` says otherwise, ``AWS_MAX_ATTEMPTS`` attempts. Every failure of an S3
request (refused connection, timeout, 5xx after the retries, missing credentials) becomes a
:class:`StorageError` whose one-line message names the URI and the cause.

Temporary names and their cleanup are ``tempfiles``; the exclusive and compare-and-replace
writes that leases and claims use are ``exclusive``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import IO, Any

from . import failpoints
from .tempfiles import TEMP_MARK, is_temp_name, owner_tag, temp_name_for

S3_PART_SIZE = 8 * 1024 * 1024  # S3 wants >= 5 MiB for all parts but the last
_S3_SPOOL_MAX = 64 * 1024 * 1024  # reads below this stay in memory


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report as-is (one line)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path components for a local path or an s3:// URI."""
    base = str(base)
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out = out + "/" + str(p).strip("/")
        return out
    return os.path.join(base, *[str(p) for p in parts])


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def split_s3(uri: str) -> tuple[str, str]:
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key


_clients: dict[int, Any] = {}
_client_lock = threading.Lock()


def s3_client():
    """A boto3 S3 client per process (clients are thread-safe but not fork-safe)."""
    pid = os.getpid()
    with _client_lock:
        client = _clients.get(pid)
        if client is None:
            import boto3
            from botocore.config import Config

            # no max_attempts here: boto3 then takes AWS_MAX_ATTEMPTS from the environment
            retries = {} if os.environ.get("AWS_RETRY_MODE") else {"mode": "standard"}
            # a session of its own: boto3's default session keeps the first credentials
            # it resolved, so a process that moves to another endpoint would sign for the old
            client = boto3.session.Session().client(
                "s3",
                config=Config(
                    retries=retries,
                    connect_timeout=float(os.environ.get("MOFI_S3_CONNECT_TIMEOUT", "10")),
                    read_timeout=float(os.environ.get("MOFI_S3_READ_TIMEOUT", "60")),
                ),
            )
            _clients[pid] = client
        return client


def reset_clients() -> None:
    """Forget the cached clients, so the next ``s3_client()`` reads the environment as it is now
    (after a change of endpoint or keys). Under the lock: a client another thread is creating
    meanwhile (say a heartbeat, from the environment as it was) is not cached after the reset."""
    with _client_lock:
        _clients.clear()


def _s3_error(uri: str, exc: Exception) -> StorageError:
    cause = " ".join(str(exc).split()) or type(exc).__name__
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    where = f" (endpoint {endpoint})" if endpoint else ""
    return StorageError(f"S3 request for {uri} failed{where}: {cause}")


def _missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn any botocore failure into a one-line StorageError (a 404 into FileNotFoundError)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        if _missing(exc):
            raise FileNotFoundError(f"no such object: {uri}") from exc
        raise _s3_error(uri, exc) from exc
    except BotoCoreError as exc:  # connection refused, timeouts, no credentials, ...
        raise _s3_error(uri, exc) from exc


# --------------------------------------------------------------------------- reads


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            with _s3_errors(uri):
                s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            return False
    return os.path.exists(uri)


def size(uri: str) -> int:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(uri)


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A seekable binary reader. Missing files raise FileNotFoundError naming the URI."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        spool = tempfile.SpooledTemporaryFile(max_size=_S3_SPOOL_MAX)
        try:
            with _s3_errors(uri):
                s3_client().download_fileobj(bucket, key, spool)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        try:
            yield spool
        finally:
            spool.close()
    else:
        if not os.path.exists(uri):
            raise FileNotFoundError(f"no such file: {uri}")
        with open(uri, "rb") as f:
            yield f


def read_range(uri: str, start: int, length: int) -> bytes:
    """``length`` bytes from offset ``start`` (fewer at the end); on S3 one ranged GET, so
    a footer or a header is read without downloading the object."""
    if length <= 0:
        return b""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            resp = s3_client().get_object(
                Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
            )
            return resp["Body"].read()
    with open(uri, "rb") as f:
        f.seek(start)
        return f.read(length)


def fingerprint(uri: str, length: int = 16) -> str:
    """A short content hash of one file (sha1, streamed): names the weights a cache belongs to."""
    import hashlib

    h = hashlib.sha1()
    with open_read(uri) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


@contextlib.contextmanager
def local_path(uri: str) -> Iterator[str]:
    """A local filesystem path holding the object (downloaded to a temp file for S3)."""
    if not is_s3(uri):
        if not os.path.exists(uri):
            raise FileNotFoundError(f"no such file: {uri}")
        yield uri
        return
    bucket, key = split_s3(uri)
    fd, tmp = tempfile.mkstemp(prefix="mofi-", suffix="-" + basename(uri))
    os.close(fd)
    try:
        with _s3_errors(uri):
            s3_client().download_file(bucket, key, tmp)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def list_files(prefix: str, suffix: str | None = None, recursive: bool = False) -> list[str]:
    """Sorted URIs of the published files directly under ``prefix`` (or below, if recursive).

    Temporary names are never listed. A missing prefix lists as empty.
    """
    out: list[str] = []
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"
        for obj in _s3_list(bucket, key, recursive, prefix):
            name = obj["Key"]
            if is_temp_name(name) or name.endswith("/"):
                continue
            if suffix and not name.endswith(suffix):
                continue
            out.append(f"s3://{bucket}/{name}")
    else:
        if not os.path.isdir(prefix):
            return []
        if recursive:
            for root, dirs, files in os.walk(prefix):
                dirs[:] = [d for d in dirs if not is_temp_name(d)]
                for name in files:
                    if is_temp_name(name) or (suffix and not name.endswith(suffix)):
                        continue
                    out.append(os.path.join(root, name))
        else:
            for entry in os.scandir(prefix):
                if not entry.is_file() or is_temp_name(entry.name):
                    continue
                if suffix and not entry.name.endswith(suffix):
                    continue
                out.append(os.path.join(prefix, entry.name))
    return sorted(out)


def _s3_list(bucket: str, key: str, recursive: bool, uri: str) -> Iterator[dict[str, Any]]:
    """Every object under ``key`` (paginated), with its Key, Size and ETag."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
    if not recursive:
        kwargs["Delimiter"] = "/"
    with _s3_errors(uri):
        for page in s3_client().get_paginator("list_objects_v2").paginate(**kwargs):
            yield from page.get("Contents", [])


def list_sizes(prefix: str, suffix: str | None = None) -> dict[str, int]:
    """URI -> size of the published files directly under ``prefix`` (one listing on S3)."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"
        return {
            f"s3://{bucket}/{o['Key']}": int(o["Size"])
            for o in _s3_list(bucket, key, False, prefix)
            if not is_temp_name(o["Key"]) and (not suffix or o["Key"].endswith(suffix))
        }
    if not os.path.isdir(prefix):
        return {}
    return {
        os.path.join(prefix, e.name): e.stat().st_size
        for e in os.scandir(prefix)
        if e.is_file() and not is_temp_name(e.name) and (not suffix or e.name.endswith(suffix))
    }


def sha256(uri: str) -> str:
    """The content's sha256 (streamed)."""
    import hashlib

    h = hashlib.sha256()
    with open_read(uri) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_id(uri: str) -> str:
    """What a file's bytes are, cheaply: ``sha256:HEX`` of a local file (streamed), and on S3
    ``etag:ETAG:SIZE`` from one HEAD (the server's checksum; nothing is downloaded). Other
    bytes always give another id; the same bytes uploaded again in other multipart sizes may
    give another id too, which only costs a redo."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            head = s3_client().head_object(Bucket=bucket, Key=key)
        return f"etag:{head['ETag'].strip(chr(34))}:{int(head['ContentLength'])}"
    return f"sha256:{sha256(uri)}"


# -------------------------------------------------------------------------- writes


@contextlib.contextmanager
def open_write(uri: str, content_type: str | None = None) -> Iterator[IO[bytes]]:
    """Binary writer that publishes ``uri`` atomically when the block exits cleanly.

    If the block raises, nothing is published and the temporary data is removed.
    """
    if is_s3(uri):
        from .s3_writer import S3Writer

        writer = S3Writer(uri, content_type)
        try:
            yield writer  # type: ignore[misc]
        except BaseException:
            writer.abort()
            raise
        failpoints.hit("publish", uri)
        try:
            with _s3_errors(uri):
                writer.commit()
        except BaseException:
            writer.abort()
            raise
        return
    parent = os.path.dirname(os.path.abspath(uri))
    os.makedirs(parent, exist_ok=True)
    tmp = temp_name_for(os.path.abspath(uri))
    f = open(tmp, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        failpoints.hit("publish", uri)
        os.replace(tmp, uri)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    with open_write(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any, indent: int | None = 2) -> None:
    write_text(uri, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def publish_file(local_file: str, uri: str) -> None:
    """Publish a finished local file at ``uri`` atomically (rename or S3 multipart upload)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        from boto3.s3.transfer import TransferConfig

        with _s3_errors(uri):
            s3_client().upload_file(
                local_file,
                bucket,
                key,
                Config=TransferConfig(
                    multipart_threshold=S3_PART_SIZE, multipart_chunksize=S3_PART_SIZE
                ),
            )
        return
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    tmp = temp_name_for(os.path.abspath(uri))
    shutil.copyfile(local_file, tmp)
    os.replace(tmp, uri)


def copy(src: str, dst: str) -> str:
    """Publish a copy of ``src`` at ``dst`` and say how: ``server`` (S3 to S3: a server-side
    copy, multipart above 5 GB, no bytes through this process), ``link`` (local: a hard link
    to the same inode; safe because every publish here renames a new file into place and
    never writes into a published one) or ``bytes`` (across file systems or stores)."""
    if is_s3(src) and is_s3(dst):
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)
        from boto3.s3.transfer import TransferConfig

        with _s3_errors(src):
            s3_client().copy(
                {"Bucket": sb, "Key": sk},
                db,
                dk,
                Config=TransferConfig(multipart_threshold=5 << 30, multipart_chunksize=1 << 30),
            )
        return "server"
    if not is_s3(src) and not is_s3(dst):
        if not os.path.exists(src):
            raise FileNotFoundError(f"no such file: {src}")
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        tmp = temp_name_for(os.path.abspath(dst))
        try:
            os.link(src, tmp)
            how = "link"
        except OSError:  # another file system, or links not supported
            shutil.copyfile(src, tmp)
            how = "bytes"
        os.replace(tmp, dst)
        return how
    with local_path(src) as path:
        publish_file(path, dst)
    return "bytes"


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(uri)


def makedirs(uri: str) -> None:
    """Create a local directory (S3 has no directories: a no-op there)."""
    if not is_s3(uri):
        os.makedirs(uri, exist_ok=True)


def check_writable(uri: str) -> None:
    """Fail early, naming ``uri``, when an output root cannot be written (before any compute)."""
    probe = join(uri, f"{TEMP_MARK}probe-{owner_tag()}-{uuid.uuid4().hex[:8]}")
    if is_s3(uri):
        bucket, key = split_s3(probe)
        with _s3_errors(uri):
            s3_client().put_object(Bucket=bucket, Key=key, Body=b"")
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    try:
        os.makedirs(uri, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise StorageError(f"cannot write to {uri}: {exc.strerror or exc}") from exc
