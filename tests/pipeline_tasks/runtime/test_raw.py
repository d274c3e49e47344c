from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline_tasks.runtime import raw
from pipeline_tasks.stages.write.stage import plan_output


@pytest.mark.parametrize(
    "name, ok",
    [
        ("000.jpg", True),
        ("a/b/000.jpg", True),
        ("/etc/passwd", False),
        ("../x.jpg", False),
        ("a/../../x.jpg", False),
        ("a/../x.jpg", True),
        ("C:\\\\x.jpg", False),
        ("", False),
        ("\\\\server\\x.jpg", False),
    ],
)
def test_safe_member_name(name, ok):
    assert raw.safe_member_name(name) is ok


def test_decode_image_reasons():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, format="JPEG")
    good = buf.getvalue()
    im, reason = raw.decode_image(good, 10_000)
    assert reason is None and im.size == (40, 30)
    assert raw.decode_image(None, 10_000) == (None, "image_missing")
    assert raw.decode_image(b"", 10_000) == (None, "image_empty")
    assert raw.decode_image(b"not an image at all", 10_000) == (None, "image_corrupt")
    assert raw.decode_image(good, 100) == (None, "image_too_large")
    assert raw.decode_image(good[: len(good) // 2], 10_000)[1] in (
        "image_truncated",
        "image_corrupt",
    )


def test_discover_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="raw input not found"):
        raw.discover(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no raw shards"):
        raw.discover(str(tmp_path / "empty"))


def test_plan_output_covers_every_sample_once():
    counts = [("00000", 5), ("00001", 0), ("00002", 8), ("00003", 3)]
    same = plan_output(counts, 0)
    assert [o["out"] for o in same] == ["00000", "00002", "00003"]
    outs = plan_output(counts, 4)
    assert [o["out"] for o in outs] == ["00000", "00001", "00002", "00003"]
    assert outs[1]["parts"] == [("00000", 4, 5), ("00002", 0, 3)]
    covered = [(sid, i) for o in outs for sid, a, b in o["parts"] for i in range(a, b)]
    assert len(covered) == len(set(covered)) == 16
