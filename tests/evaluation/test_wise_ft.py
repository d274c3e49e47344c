"""WiSE-FT (`mofi wise-ft`): weight interpolation, the choice of alpha on a validation folder,
and the written checkpoint, on the packaged towers (real pretrained weights)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from mofi_testdata import make_eval_folder

from evaluation.run import EvalConfig, run_eval
from pipeline_tasks import cli
from training.config import DualEncoderConfig
from training.core.config import ConfigError
from training.model import DualEncoder, load_checkpoint, save_checkpoint
from training.wise import choose_alpha, initial_tower_state, interpolate


def test_interpolate_moves_only_the_towers():
    initial = {"image_tower.w": torch.zeros(3), "text_tower.n": torch.tensor(0)}
    ft = {
        "image_tower.w": torch.full((3,), 2.0),
        "text_tower.n": torch.tensor(7),
        "head.w": torch.ones(2),
    }
    assert torch.equal(interpolate(ft, initial, 0.0)["image_tower.w"], torch.zeros(3))
    assert torch.equal(interpolate(ft, initial, 1.0)["image_tower.w"], ft["image_tower.w"])
    mid = interpolate(ft, initial, 0.25)
    assert torch.allclose(mid["image_tower.w"], torch.full((3,), 0.5))
    assert mid["text_tower.n"].item() == 7  # integer buffers come from the fine-tuned model
    assert torch.equal(mid["head.w"], ft["head.w"])  # no pretrained counterpart: unchanged
    with pytest.raises(ValueError, match="alpha"):
        interpolate(ft, initial, 1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate(ft, {"image_tower.w": torch.zeros(4)}, 0.5)


def test_choose_alpha_is_the_smallest_within_tolerance_of_the_best():
    curve = [(0.0, 0.50), (0.3, 0.66), (0.5, 0.695), (0.7, 0.70), (1.0, 0.68)]
    assert choose_alpha(curve, 0.01) == 0.5
    assert choose_alpha(curve, 0.0) == 0.7
    assert choose_alpha(curve, 1.0) == 0.0


def test_random_init_towers_have_nothing_to_mix_with():
    c = DualEncoderConfig(image_tower="openclip:mofi-tiny-vit", text_tower="openclip:mofi-tiny-vit")
    with pytest.raises(ValueError, match="random initialisation"):
        initial_tower_state(c)


@pytest.fixture
def finetuned(tmp_path):
    """Packaged towers with their weights moved away from the pretrained ones, as training would."""
    config = DualEncoderConfig(embed_dim=32, proj="linear")
    model = DualEncoder(config, pretrained_towers=True)
    g = torch.Generator().manual_seed(0)
    state = model.state_dict()
    for k, v in state.items():
        if k.startswith("image_tower.") and v.is_floating_point() and v.ndim > 1:
            state[k] = v + 0.5 * v.std() * torch.randn(v.shape, generator=g)
    uri = str(tmp_path / "run" / "model.pt")
    save_checkpoint(uri, "dual_encoder", config, state, {"i2e_version": "abc"})
    return uri, state


def test_wise_ft_cli_writes_the_checkpoint_at_the_chosen_alpha(tmp_path, finetuned, capsys):
    uri, ft_state = finetuned
    val = make_eval_folder(tmp_path / "val", per_class=3, n_classes=4, seed=3)
    report = make_eval_folder(tmp_path / "photos", per_class=3, n_classes=4, seed=4)
    rc = cli.main(
        [
            "wise-ft",
            "--model",
            uri,
            "--val",
            val,
            "--report",
            report,
            "--alphas",
            "0,0.5,1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    out = os.path.join(os.path.dirname(uri), "model.wise.pt")
    with open(os.path.join(os.path.dirname(uri), "model.wise.curve.json")) as f:
        rec = json.load(f)
    assert [a for a, _ in rec["curve"]["val"]] == [0.0, 0.5, 1.0]
    assert set(rec["curve"]) == {"val", "photos"}
    assert rec["alpha"] == choose_alpha([tuple(p) for p in rec["curve"]["val"]], 0.01)
    assert "wise-ft: alpha" in capsys.readouterr().out

    payload = load_checkpoint(out)
    assert payload["extra"]["wise_ft"]["alpha"] == rec["alpha"]
    initial = initial_tower_state(DualEncoderConfig.from_dict(payload["config"]))
    k = next(k for k in initial if k.startswith("image_tower.") and initial[k].ndim > 1)
    want = torch.lerp(initial[k], ft_state[k], rec["alpha"])
    assert torch.allclose(payload["state_dict"][k], want, atol=1e-6)
    # the mixed checkpoint is an ordinary model: eval reads it and measures what the curve says
    c = EvalConfig(workers=0, batch_size=6, zero_shot=False, linear_probe=False, device="cpu")
    res = run_eval(out, val, None, c, results_url="", progress=False)
    got = dict(rec["curve"]["val"])[rec["alpha"]]
    assert res["metrics"]["map"] == pytest.approx(got, abs=1e-3)


def test_identity_projection_mixes_back_to_the_backbone_exactly():
    """With image_proj_init = identity the projection is mixed too: at alpha 0 the model's
    image embedding is the pretrained tower's own (normalised) features."""
    config = DualEncoderConfig(embed_dim=1280, proj="linear", image_proj_init="identity")
    model = DualEncoder(config, pretrained_towers=True).eval()
    initial = initial_tower_state(config)
    assert any(k.startswith("image_proj.") for k in initial)
    state = model.state_dict()
    g = torch.Generator().manual_seed(1)
    moved = {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if k.startswith("image_proj.") else v
        for k, v in state.items()
    }
    x = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        model.load_state_dict(moved)
        assert not torch.allclose(
            model.encode_image(x), F.normalize(model.image_features(x), dim=-1), atol=1e-3
        )
        model.load_state_dict(interpolate(moved, initial, 0.0))
        torch.testing.assert_close(
            model.encode_image(x), F.normalize(model.image_features(x), dim=-1)
        )
    with pytest.raises(ConfigError, match="identity needs proj = linear"):
        DualEncoderConfig(embed_dim=1280, image_proj_init="identity").validate()
    with pytest.raises(ConfigError, match="embed_dim = the image tower's width"):
        DualEncoder(config.replace(embed_dim=64), pretrained_towers=False)
