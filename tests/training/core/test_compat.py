from __future__ import annotations

import subprocess
import sys

from training.core.compat import ensure_torchvision


def test_torchvision_and_model_libraries_import():
    mode = ensure_torchvision()
    assert mode in ("native", "shimmed")
    import open_clip
    import timm  # noqa: F401
    import torchvision  # noqa: F401
    from transformers import CLIPModel  # noqa: F401

    model = open_clip.create_model("RN50", pretrained=None)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_shim_is_needed_only_where_ops_do_not_load():
    """A fresh interpreter: plain `import torchvision` fails exactly when we shim."""
    code = "import torchvision"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    shimmed = subprocess.run(
        [
            sys.executable,
            "-c",
            "from training.core.compat import ensure_torchvision as e; m=e(); import torchvision; print(m)",
        ],
        capture_output=True,
        text=True,
    )
    assert shimmed.returncode == 0, shimmed.stderr
    mode = shimmed.stdout.strip()
    if plain.returncode == 0:
        assert mode == "native"
    else:
        assert "torchvision::nms does not exist" in plain.stderr
        assert mode == "shimmed"
