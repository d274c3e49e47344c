"""Make ``import torchvision`` work when its compiled ops cannot load.

PyPI's torchvision 0.28.0 is a CUDA build. Next to the CPU build of torch 2.13.0 its
``_C.so`` fails to load, and ``torchvision/_meta_registrations.py`` then dies with
``RuntimeError: operator torchvision::nms does not exist`` (pytorch/vision#9085). That
breaks open_clip, timm and transformers' model classes, which import torchvision.

``ensure_torchvision()`` tries to load the compiled ops exactly as torchvision would; only
if that fails does it declare the two schemas the meta registrations need
(``torchvision::nms`` and ``torchvision::qnms``) through ``torch.library``, without any
kernel. Calling those ops then raises (we never use them; images are decoded with PIL,
not ``torchvision.io``). Where the ops load (a CUDA machine with a matching torch) this is
a no-op. It must run before anything imports torchvision: every module of ours that
imports open_clip, timm or transformers goes through :func:`import_open_clip` or calls
this first, and ``tests/conftest.py`` calls it for the test session.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading

_lock = threading.Lock()
_state: dict[str, object] = {}
_SCHEMAS = {  # op name -> schema, as torchvision declares them
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def ensure_torchvision() -> str:
    """Returns 'native' (compiled ops load), 'shimmed' (schemas defined), or 'absent'."""
    with _lock:
        if "mode" in _state:
            return _state["mode"]  # type: ignore[return-value]
        mode = _ensure()
        _state["mode"] = mode
        return mode


def _ensure() -> str:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    import torch

    if "torchvision" in sys.modules:
        # Already imported (successfully, or it would not be in sys.modules): nothing to fix.
        return "native"
    lib_dir = list(spec.submodule_search_locations)[0]
    candidates = [
        f for f in os.listdir(lib_dir) if f.startswith("_C") and f.endswith((".so", ".pyd"))
    ]
    for name in candidates:
        try:
            torch.ops.load_library(os.path.join(lib_dir, name))
            return "native"
        except (OSError, RuntimeError):
            continue
    # Compiled ops are unusable: declare the schemas so the fake registrations succeed.
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        try:
            lib.define(schema)
        except RuntimeError:  # already defined (by an earlier shim in this process)
            pass
    _state["lib"] = lib  # keep the library object alive for the process lifetime
    return "shimmed"


def import_open_clip():
    """Import open_clip after making torchvision importable."""
    ensure_torchvision()
    import open_clip

    return open_clip
