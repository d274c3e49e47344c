"""The S3 side of :func:`training.core.storage.open_write`: a buffered writer that streams
the parts of a multipart upload and publishes the object only on ``commit``."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from .storage import S3_PART_SIZE, _s3_errors, s3_client, split_s3


class S3Writer(io.RawIOBase):
    """Buffered writer that streams parts of a multipart upload.

    Small objects go up with one PUT. Nothing is visible until ``commit``.
    """

    def __init__(self, uri: str, content_type: str | None = None):
        super().__init__()
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.extra = {"ContentType": content_type} if content_type else {}
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.buf.extend(b)
        self.written += len(b)
        while len(self.buf) >= S3_PART_SIZE:
            self._upload_part(bytes(self.buf[:S3_PART_SIZE]))
            del self.buf[:S3_PART_SIZE]
        return len(b)

    def _upload_part(self, data: bytes) -> None:
        with _s3_errors(self.uri):
            self._upload_part_raw(data)

    def _upload_part_raw(self, data: bytes) -> None:
        client = s3_client()
        if self.upload_id is None:
            resp = client.create_multipart_upload(Bucket=self.bucket, Key=self.key, **self.extra)
            self.upload_id = resp["UploadId"]
        n = len(self.parts) + 1
        resp = client.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n, Body=data
        )
        self.parts.append({"ETag": resp["ETag"], "PartNumber": n})

    def commit(self) -> None:
        client = s3_client()
        if self.upload_id is None:
            client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buf), **self.extra)
        else:
            if self.buf:
                self._upload_part(bytes(self.buf))
            self._complete(client)
        self.buf = bytearray()

    def _complete(self, client) -> None:
        from botocore.exceptions import ClientError

        try:
            client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        except ClientError as exc:
            # a retry after the answer to an applied completion was lost finds no upload:
            # the object there, with the ETag of exactly our parts, is our completion
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            etag = client.head_object(Bucket=self.bucket, Key=self.key)["ETag"].strip('"')
            if etag != self._multipart_etag():
                raise
            self.upload_id = None  # completed: nothing left to abort

    def _multipart_etag(self) -> str:
        """S3's ETag of a multipart object: md5 of the parts' md5s, dash, the part count."""
        import hashlib

        digests = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in self.parts)
        return f"{hashlib.md5(digests).hexdigest()}-{len(self.parts)}"

    def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                s3_client().abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
                )
        self.buf = bytearray()
