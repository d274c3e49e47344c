"""Reading raw input (img2dataset layout) defensively: shard discovery, tar members, images.

Raw input is untrusted. A shard whose tar or Parquet is missing, a tar member with an
absolute or ``..`` name, a member that is not a regular file or is enormous, a truncated
tar, an image that is empty, corrupt, truncated or a decompression bomb: each becomes a
counted skip with a reason. Nothing is ever extracted to disk, so member names cannot
write outside any root.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator

from training.core import storage

SHARD_FILE = re.compile(r"^(\d{5,})\.(tar|parquet)$")
TAR_MTIME = 1_700_000_000  # fixed member mtime: re-runs give byte-identical tars
MAX_MEMBER_BYTES = 64 * 1024 * 1024
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclasses.dataclass(frozen=True)
class RawShard:
    shard: str
    tar: str
    parquet: str


def discover(raw_uri: str) -> tuple[list[RawShard], dict[str, str]]:
    """Complete shards (tar + Parquet) sorted by id, and shard -> reason for incomplete ones."""
    if not storage.is_s3(raw_uri) and not storage.exists(raw_uri):
        raise FileNotFoundError(f"raw input not found: {raw_uri}")
    found: dict[str, dict[str, str]] = {}
    for uri in storage.list_files(raw_uri):
        m = SHARD_FILE.match(storage.basename(uri))
        if m:
            found.setdefault(m.group(1), {})[m.group(2)] = uri
    shards, problems = [], {}
    for sid in sorted(found):
        kinds = found[sid]
        if "tar" in kinds and "parquet" in kinds:
            shards.append(RawShard(sid, kinds["tar"], kinds["parquet"]))
        elif "tar" in kinds:
            problems[sid] = "tar_without_parquet"
        else:
            problems[sid] = "parquet_without_tar"
    if not shards and not problems:
        raise FileNotFoundError(f"no raw shards ({{shard:05d}}.tar + .parquet) under {raw_uri}")
    return shards, problems


RAW_COLUMNS = ("key", "caption")


def check_shards(shards: list[RawShard]) -> None:
    """Before any work: each shard's Parquet is whole and has ``key`` and ``caption``, each
    tar is a whole tar archive (first header, end-of-archive blocks). A damaged file is an
    :class:`~training.core.inputs.InputError` naming it; damage inside a whole tar (a bad
    member, a corrupt image) stays a counted skip of that sample."""
    from training.core.inputs import check_all, check_parquet, check_tar

    checks: list[tuple] = []
    for s in shards:
        checks.append((check_parquet, s.parquet, RAW_COLUMNS, f"raw shard {s.shard}'s Parquet"))
        checks.append((check_tar, s.tar, f"raw shard {s.shard}'s tar"))
    check_all(checks)


def safe_member_name(name: str) -> bool:
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    norm = posixpath.normpath(name.replace("\\", "/"))
    return not (norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/")


def split_key(name: str) -> tuple[str, str]:
    """'dir/000010002.jpg' -> ('dir/000010002', 'jpg'); webdataset's rule: the first dot of the basename."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def iter_tar_samples(
    tar_uri: str,
    drop: Callable[[str, str], None],
    wanted: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "json", "txt"),
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for consecutive members sharing a key, as webdataset groups them."""
    key, group = None, {}
    with storage.open_read(tar_uri) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*")
        except tarfile.TarError as exc:
            drop("tar_unreadable", f"{tar_uri}: {exc}")
            return
        try:
            for member in tar:
                if not safe_member_name(member.name):
                    drop("unsafe_member_name", f"{tar_uri}: {member.name!r}")
                    continue
                if not member.isfile():
                    if not member.isdir():
                        drop("non_file_member", f"{tar_uri}: {member.name!r}")
                    continue
                k, ext = split_key(member.name)
                if ext not in wanted:
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    drop("member_too_large", f"{tar_uri}: {member.name} is {member.size} bytes")
                    continue
                fh = tar.extractfile(member)
                data = fh.read() if fh else b""
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                group[ext] = data
        except (tarfile.TarError, OSError, EOFError) as exc:
            drop("tar_truncated", f"{tar_uri}: {exc}")
        finally:
            tar.close()
    if key is not None:
        yield key, group


def image_bytes(group: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in group:
            return group[ext]
    return None


def _reason(exc: Exception) -> str:
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, Image.DecompressionBombError):
        return "image_too_large"
    if isinstance(exc, UnidentifiedImageError):
        return "image_corrupt"
    return "image_truncated" if "truncated" in str(exc).lower() else "image_corrupt"


def open_image(data: bytes | None, max_pixels: int):
    """(PIL image with only its header read, None) or (None, drop reason): the checks every
    decoder (PIL, or the device's) runs before it spends time on the pixels."""
    from PIL import Image

    if data is None:
        return None, "image_missing"
    if len(data) == 0:
        return None, "image_empty"
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        return None, _reason(exc)
    if w <= 0 or h <= 0:
        return None, "image_corrupt"
    if w * h > max_pixels:
        return None, "image_too_large"
    return im, None


def decode_image(data: bytes | None, max_pixels: int, draft_size: int | None = None):
    """(PIL RGB image, None) or (None, drop reason). Checks the header before decoding."""
    from training.transforms import as_rgb

    im, reason = open_image(data, max_pixels)
    if reason:
        return None, reason
    try:
        if draft_size and im.format == "JPEG":
            # decode at a reduced DCT scale when the image is far larger than needed
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        return as_rgb(im), None
    except (OSError, SyntaxError, ValueError) as exc:
        return None, _reason(exc)


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular-file member with fixed metadata, so the same content gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
