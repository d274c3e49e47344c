from __future__ import annotations

import os

import pytest

from pipeline_tasks.demo import stamps


def test_index_folder_counts_every_kind_of_bad_input(picture_folder):
    bad = picture_folder / "junk"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "zero.txt").write_text("A zero-byte picture.")
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (bad / "corrupt.txt").write_text("A corrupt picture.")
    (bad / "latin1.png").write_bytes((picture_folder / "vehicles" / "car.png").read_bytes())
    (bad / "latin1.txt").write_bytes("Un caf\xe9 cr\xe8me.".encode("latin-1"))
    (bad / "vector.svg").write_text("<svg/>")
    (bad / "vector.txt").write_text("A vector picture.")
    (bad / "lonely.txt").write_text("A caption without picture.")
    (bad / "blank.png").write_bytes((picture_folder / "vehicles" / "car.png").read_bytes())
    (bad / "blank.txt").write_text("\n\n")
    records, stats = stamps.index_folder(str(picture_folder))
    assert len(records) == 13 == stats.n_out
    assert stats.drops == {
        "image_zero_bytes": 1,
        "image_unreadable": 1,
        "caption_not_utf8": 1,
        "svg_only": 1,
        "no_picture": 1,
        "caption_empty": 1,
    }
    by_id = {r["stamp_id"]: r for r in records}
    assert by_id["fruit/cartoon/apple_green"]["category"] == "fruit"  # style folder folded
    assert by_id["animals/birds/owl"]["caption"] == "An owl."  # line 1 only


def test_ensure_stamps_indexes_a_user_folder_once(picture_folder):
    path = stamps.ensure_stamps(str(picture_folder))
    assert os.path.exists(os.path.join(path, stamps.INDEX_FILE))
    assert len(stamps.list_stamps(path)) == 13


def test_folder_without_any_pair_is_a_clear_error(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "a.txt").write_text("caption but no picture")
    with pytest.raises(FileNotFoundError, match="no usable picture"):
        stamps.ensure_stamps(str(d))
