from __future__ import annotations

import pytest
import torch

from training.core.config import ConfigError
from training.model import (
    DualEncoder,
    DualEncoderConfig,
    checkpoint_state,
    load_checkpoint,
    load_dual_encoder,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DualEncoder(DualEncoderConfig(embed_dim=32, image_size=64, center_images=True)).eval()


def test_packaged_towers_load_and_embed(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model.encode_image(x)
        b = model.encode_text(
            model.tokenize(["a photo of a penguin.", "Paris, capital of France."])
        )
    assert a.shape == b.shape == (2, 32)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not any(p.requires_grad for p in model.image_tower.parameters())


def test_checkpoint_round_trip_without_towers(model, tmp_path):
    model.image_center.fill_(0.01)
    uri = str(tmp_path / "m.pt")
    state = checkpoint_state(model, save_towers=False)
    assert not any(k.startswith(("image_tower.", "text_tower.")) for k in state)
    save_checkpoint(uri, "dual_encoder", model.config, state)
    again = load_dual_encoder(uri).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), again.encode_image(x), atol=1e-5)


def test_bad_checkpoints_fail_clearly(model, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_checkpoint(str(junk))
    other = str(tmp_path / "other.pt")
    save_checkpoint(other, "mofi", model.config, checkpoint_state(model, save_towers=False))
    with pytest.raises(ConfigError, match="not a dual encoder"):
        load_dual_encoder(other)
    wrong = str(tmp_path / "wrong.pt")
    save_checkpoint(
        wrong,
        "dual_encoder",
        model.config.replace(embed_dim=16),
        checkpoint_state(model, save_towers=False),
    )
    with pytest.raises(ConfigError, match="does not match"):
        load_dual_encoder(wrong)
