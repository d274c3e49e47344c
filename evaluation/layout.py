"""An evaluation folder's file names (GPR1200 naming), for whoever writes one (the demo's
corpus and photographs) and for the reader (``images.read_folder``).

``{class_id}_{anything}.jpg``: the class id is the integer before the first underscore
(GPR1200's own reader does ``name.split("_")[0]``); ``classes.json`` beside the images
(``{"id": "name"}`` or ``{"id": {"name"|"category": ...}}``) names the classes.
"""

from __future__ import annotations

CLASSES_FILE = "classes.json"


def image_name(class_id: int, stem: str, suffix: str = ".jpg") -> str:
    return f"{class_id}_{stem}{suffix}"


def class_of(name: str) -> int | None:
    """The class id a file name carries, None when it has none."""
    head = name.split("_", 1)[0]
    return int(head) if "_" in name and head.isdigit() else None


def folder_name(uri: str) -> str:
    """An evaluation folder's name (what metrics files and result rows call it)."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or "images"
