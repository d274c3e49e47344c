"""`mofi eval` and `mofi results` on real models: our checkpoint, open_clip from a local file,
the packaged backbone; bad input; the results store, Pushgateway and chart."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import sqlite3
import threading

import numpy as np
import pytest
import torch
from mofi_testdata import make_eval_folder

from evaluation import images, results
from evaluation.run import EvalConfig, run_eval
from pipeline_tasks import cli
from training.config import DualEncoderConfig
from training.core.config import ConfigError
from training.model import DualEncoder, checkpoint_state, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def _eval_folder(root, per_class=3, n_classes=4):
    root = make_eval_folder(root, per_class=per_class, n_classes=n_classes)
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump({str(c): {"category": f"shapes/colour_{c}"} for c in range(n_classes)}, f)
    return root


@pytest.fixture
def folder(tmp_path):
    return _eval_folder(tmp_path / "eval")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = DualEncoderConfig(
        image_tower="openclip:mofi-tiny-vit",
        text_tower="openclip:mofi-tiny-vit",
        embed_dim=16,
        proj="linear",
    )
    model = DualEncoder(config)
    uri = str(tmp_path / "ckpt" / "model.pt")
    save_checkpoint(
        uri, "dual_encoder", config, checkpoint_state(model, True),
        {"i2e_version": "abc", "i2e_hygiene": HYGIENE},
    )  # fmt: skip
    return uri


HYGIENE = {"settings": {"near_duplicates": True, "near_threshold": 0.9}, "drops": {"nsfw": 2}}


def _cfg(**kw):
    return EvalConfig(workers=0, batch_size=5, **kw)


def test_read_folder_orders_and_names(folder):
    f = images.read_folder(folder)
    assert f.labels == sorted(f.labels) and len(f.files) == 12
    assert f.class_names[2] == "colour 2"


def test_folder_without_the_naming_convention(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"x")
    (d / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="GPR1200 naming.*no_class_prefix"):
        images.read_folder(str(d))


def test_mofi_preprocess_is_a_tensor_resize_without_antialias():
    from PIL import Image

    im = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    x = images.make_preprocess("mofi", 64, (0.5,) * 3, (0.5,) * 3)(im)
    assert x.shape == (3, 224, 224)
    ref = torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] / 255
    ref = torch.nn.functional.interpolate(ref, size=(224, 299), mode="bicubic", antialias=False)[0]
    ref = ref[:, :, 37 : 37 + 224]
    mean = torch.tensor(images.OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(images.OPENAI_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (ref - mean) / std)
    y = images.make_preprocess("model", 64, (0.5,) * 3, (0.5,) * 3)(im)
    assert y.shape == (3, 64, 64)


def test_eval_our_checkpoint_with_bad_images_and_a_singleton(folder, tiny_checkpoint, tmp_path):
    open(os.path.join(folder, "1_broken.jpg"), "wb").write(b"\xff\xd8 not a jpeg")
    shutil.copy(os.path.join(folder, "0_0.jpg"), os.path.join(folder, "9_only.jpg"))
    db = f"sqlite:///{tmp_path}/results.sqlite"
    report = run_eval(
        tiny_checkpoint, folder, None, _cfg(k=3), run_id="r1", results_url=db, progress=False
    )
    assert report["skipped"] == {"unreadable": 1}
    assert report["singleton_classes"] == 1 and report["n_queries"] == 12
    m = report["metrics"]
    assert 0 < m["map"] <= 1 and "map@3" in m and "zero_shot/top1" in m and "linear_probe/top1" in m
    # metrics JSON beside the checkpoint, a row in the store
    assert report["metrics_uri"].startswith(os.path.dirname(tiny_checkpoint))
    assert json.load(open(report["metrics_uri"]))["metrics"] == m
    rows = results.read_results(db)
    assert [r["run_id"] for r in rows] == ["r1"] and rows[0]["i2e_version"] == "abc"
    # the hygiene settings that built the I2E it trained on, posted with the result
    assert report["i2e_hygiene"] == HYGIENE
    assert rows[0]["config"]["model"]["i2e_hygiene"] == HYGIENE
    con = sqlite3.connect(f"{tmp_path}/results.sqlite")
    assert dict(con.execute("select name, value from mofi_eval_metrics"))["map"] == pytest.approx(
        m["map"]
    )


def test_eval_open_clip_from_a_local_file_and_the_packaged_backbone(folder, tmp_path):
    from training.core.compat import import_open_clip
    from training.openclip import register_project_model_configs

    register_project_model_configs()
    open_clip = import_open_clip()
    torch.manual_seed(1)
    path = str(tmp_path / "oc.pt")
    torch.save(open_clip.create_model("mofi-tiny-vit").state_dict(), path)
    db = f"sqlite:///{tmp_path}/r.sqlite"
    a = run_eval(
        f"open_clip:mofi-tiny-vit:{path}",
        folder,
        str(tmp_path / "a.json"),
        _cfg(),
        results_url=db,
        progress=False,
    )
    b = run_eval(
        "packaged",
        folder,
        str(tmp_path / "b.json"),
        _cfg(preprocess="mofi"),
        results_url=db,
        progress=False,
    )
    assert "zero_shot/top1" in a["metrics"] and "zero_shot/top1" not in b["metrics"]
    # ImageNet features separate coloured shapes better than a random tiny ViT
    assert b["metrics"]["map"] > a["metrics"]["map"]
    assert len(results.read_results(db)) == 2


def test_checkpoint_that_does_not_match_its_config(tmp_path, folder):
    config = DualEncoderConfig(
        image_tower="openclip:mofi-tiny-vit",
        text_tower="openclip:mofi-tiny-vit",
        embed_dim=16,
        proj="linear",
    )
    model = DualEncoder(config)
    state = checkpoint_state(model, True)
    state["image_proj.weight"] = torch.zeros(8, 3)
    uri = str(tmp_path / "bad.pt")
    save_checkpoint(uri, "dual_encoder", config, state)
    with pytest.raises(ConfigError, match="does not match"):
        run_eval(uri, folder, str(tmp_path / "m.json"), _cfg(), results_url="", progress=False)
    with pytest.raises(FileNotFoundError):
        run_eval(
            str(tmp_path / "missing.pt"),
            folder,
            str(tmp_path / "m.json"),
            _cfg(),
            results_url="",
            progress=False,
        )


class _Gateway(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        _Gateway.received.append((self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_push_and_results_cli(folder, tiny_checkpoint, tmp_path, capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    db = f"sqlite:///{tmp_path}/cli.sqlite"
    try:
        rc = cli.main([
            "-q", "eval", "--model", tiny_checkpoint, "--images", folder, "--results", db,
            "--push", f"http://127.0.0.1:{server.server_port}", "--run-id", "run-7",
            "--workers", "0", "--no-progress", "--domains", "gpr1200",
        ])  # fmt: skip
    finally:
        server.shutdown()
    assert rc == 0
    path, body = _Gateway.received[-1]
    assert path == "/metrics/job/mofi_eval/instance/run-7"
    assert "mofi_eval_map{" in body and 'domain="landmarks"' in body  # classes 0-3: GPR1200 block 0
    png = tmp_path / "chart.png"
    assert cli.main(["-q", "results", "--db", db, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "run-7" in out and "landmarks" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_on_an_empty_store(tmp_path, capsys):
    assert cli.main(["-q", "results", "--db", f"sqlite:///{tmp_path}/empty.sqlite"]) == 0
    assert "no results yet" in capsys.readouterr().out


def test_results_chart_groups_folders_and_shows_every_model(tmp_path):
    def row(i, run_id, model, images, m):
        return {"id": i, "run_id": run_id, "model": model, "images": images, "metrics": {"map": m}}

    rows = [
        row(1, "r", "mofi:model.pt", "/x/eval", 0.68),
        row(2, "r/packaged", "packaged", "/x/eval", 0.64),
        row(3, "r", "mofi:model.pt", "/x/photos_eval/", 0.61),
        row(4, "r/packaged", "packaged", "/x/photos_eval", 0.62),
        row(5, "r/wise", "mofi:model.wise.pt", "/x/photos_eval", 0.617),
    ]
    groups, bars, title = results.chart_series(rows)
    assert groups == ["eval", "photos_eval"] and "folder" in title
    assert bars == {
        "mofi:model.pt": [0.68, 0.61],
        "packaged": [0.64, 0.62],
        "mofi:model.wise.pt": [0.0, 0.617],
    }
    # per-domain results (GPR1200 blocks) keep one group per domain
    dom = [{**rows[0], "metrics": {"map": 0.5, "map/sketch": 0.4, "map/faces": 0.6}}]
    groups, bars, _ = results.chart_series(dom)
    assert groups == ["all", "faces", "sketch"] and list(bars.values()) == [[0.5, 0.6, 0.4]]
    png = results.write_chart(rows, str(tmp_path / "chart.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
