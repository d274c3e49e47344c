"""`mofi train` end to end with torchrun on 2 CPU processes: golden loss curve, exact resume after
a kill, the checkpoint loads for evaluation, and bad input fails before compute."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from mofi_testdata import HYGIENE_RECORD, make_eval_folder, make_i2e

from evaluation.run import EvalConfig, run_eval
from pipeline_tasks import cli
from training import recipes
from training.model import load_checkpoint, load_dual_encoder

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "cpu_test_loss.json")
pytestmark = pytest.mark.slow


def _config_file(path, **changes) -> str:
    c = recipes.cpu_test().replace(epochs=2, checkpoint_every=3, keep_checkpoints=10, **changes)
    with open(path, "w") as f:
        f.write(c.to_json())
    return str(path)


def _train_cmd(i2e, out, config_file, *extra):
    return [
        sys.executable, "-m", "pipeline_tasks.cli", "-q", "train",
        "--i2e", i2e, "--out", out, "--config-file", config_file, *extra,
    ]  # fmt: skip


def _curve(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    i2e = make_i2e(root / "i2e")
    cfg = _config_file(root / "cfg.json")
    out = str(root / "full")
    proc = subprocess.run(_train_cmd(i2e, out, cfg), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"root": root, "i2e": i2e, "cfg": cfg, "out": out, "stdout": proc.stdout}


def test_golden_loss_curve(full_run):
    curve = _curve(full_run["out"])
    assert [r["step"] for r in curve] == list(range(1, 13))  # 96 samples / (2 ranks x 8) x 2 epochs
    got = {k: [r[k] for r in curve] for k in ("loss", "loss_class", "loss_contrast", "lr")}
    if os.environ.get("MOFI_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=1)
    with open(GOLDEN) as f:
        want = json.load(f)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-6), k
    # it learns: the last epoch's mean loss is below the first's
    assert sum(got["loss"][6:]) < sum(got["loss"][:6])
    assert os.listdir(os.path.join(full_run["out"], "tb"))  # TensorBoard events


def test_checkpoint_loads_for_evaluation(full_run):
    model = load_dual_encoder(os.path.join(full_run["out"], "model.pt"))
    extra = load_checkpoint(os.path.join(full_run["out"], "model.pt"))["extra"]
    assert extra["trained_steps"] == 12 and extra["entity_head"].shape == (6, 32)
    assert extra["i2e_hygiene"] == HYGIENE_RECORD  # the I2E's hygiene, on to evaluation
    with torch.no_grad():
        z = model.encode_image(torch.randn(3, 3, model.image_size, model.image_size))
    assert z.shape == (3, 32) and torch.allclose(z.norm(dim=-1), torch.ones(3))
    # the `mofi` scorer backend filters the next I2E rebuild with it
    from pipeline_tasks import recipes as pipeline_recipes
    from pipeline_tasks.stages.score import backends as scoring

    c = pipeline_recipes.get("cpu_test").score.replace(
        backend="mofi", model=os.path.join(full_run["out"], "model.pt")
    )
    backend = scoring.build_backend(c, full_run["out"], torch.device("cpu"))
    assert backend.encode_images(scoring.reference_batch(backend, 2)).shape == (2, 32)
    assert backend.encode_texts(["thing 1, a round colour 1"]).shape == (1, 32)


def _kill_launcher_and_wait(proc: subprocess.Popen, timeout: float = 20.0) -> list:
    """SIGKILL the `mofi train` launcher alone (not its process group): every process of the
    run (torchrun, both ranks, their loader workers) must die with it. Returns the processes
    that were alive before the kill, all proven dead."""
    import psutil

    launcher = psutil.Process(proc.pid)
    tree = [launcher, *launcher.children(recursive=True)]
    assert any("training.train" in " ".join(p.cmdline()) for p in tree[1:]), "no rank was running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    assert not alive, f"still running after the launcher was killed: {[p.pid for p in alive]}"
    return tree


@pytest.mark.parametrize("kill_after", [3, 9])
def test_killed_run_resumes_bit_for_bit(full_run, kill_after):
    """Kill the run once checkpoint `kill_after` exists, prove every process is gone, run the
    same command again: the loss curve and the final weights equal the uninterrupted run's
    exactly (the checkpoint restores everything a step depends on)."""
    out = str(full_run["root"] / f"killed{kill_after}")
    proc = subprocess.Popen(
        _train_cmd(full_run["i2e"], out, full_run["cfg"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = os.path.join(out, "checkpoints", f"step_{kill_after:08d}.pt")
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill"
    tree = _kill_launcher_and_wait(proc)
    assert len(tree) >= 4  # launcher, torchrun, two ranks (and their loaders)
    assert not os.path.exists(os.path.join(out, "model.pt"))
    resumed = subprocess.run(
        _train_cmd(full_run["i2e"], out, full_run["cfg"]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming at step" in resumed.stdout
    want = _curve(full_run["out"])
    got = _curve(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        for k in ("loss", "loss_class", "loss_contrast", "lr"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    sa = load_checkpoint(os.path.join(out, "model.pt"))["state_dict"]
    sb = load_checkpoint(os.path.join(full_run["out"], "model.pt"))["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k


def test_one_run_per_out(full_run, tmp_path):
    """A second launcher on a busy --out is refused, naming the holder; once the holder is
    dead its lease no longer counts."""
    out = str(tmp_path / "busy")
    first = subprocess.Popen(
        _train_cmd(full_run["i2e"], out, full_run["cfg"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    lease = os.path.join(out, "_lease.json")
    deadline = time.time() + 120
    while not os.path.exists(lease) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(
        _train_cmd(full_run["i2e"], out, full_run["cfg"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1
    assert f"pid {first.pid} (mofi train)" in second.stderr and "held by" in second.stderr
    _kill_launcher_and_wait(first)
    assert os.path.exists(lease)  # the dead holder's lease is still on disk ...
    third = subprocess.run(
        _train_cmd(full_run["i2e"], out, full_run["cfg"], "--max-steps", "1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert third.returncode == 0, third.stderr[-3000:]  # ... but it binds nobody


def test_bad_input_fails_before_compute(full_run, tmp_path, capsys, monkeypatch):
    cfg, i2e = full_run["cfg"], full_run["i2e"]
    monkeypatch.setenv("MOFI_RDZV_WAIT_S", "3")  # the unreachable rendezvous: not 5 minutes

    def run(*args):
        rc = cli.main(["-q", "train", "--config-file", cfg, "--out", str(tmp_path / "o"), *args])
        return rc, capsys.readouterr().err

    rc, err = run("--i2e", str(tmp_path / "missing"))
    assert rc == 2 and "sizes.json is missing" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run("--i2e", str(empty))
    assert rc == 2 and "not an I2E root" in err
    # a checkpoint written by another config
    other = tmp_path / "other"
    shutil.copytree(os.path.join(full_run["out"], "checkpoints"), other / "checkpoints")
    rc = cli.main(
        ["-q", "train", "--config-file", cfg, "--i2e", i2e, "--out", str(other), "--seed", "9"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "different config (seed differ)" in err
    # an unreachable rendezvous (nothing listens on 127.0.0.2:9)
    rc, err = run("--i2e", i2e, "--nnodes", "2", "--rdzv-endpoint", "127.0.0.2:9")
    assert rc == 2 and "unreachable" in err
    # more ranks than shards
    rc, err = run("--i2e", i2e, "--nproc-per-node", "5")
    assert rc == 2 and "fewer than the 5 ranks" in err


@pytest.mark.parametrize("mode", ["supervised", "contrastive"])
def test_single_loss_modes_train_on_two_ranks(full_run, mode, tmp_path):
    out = str(tmp_path / mode)
    proc = subprocess.run(
        _train_cmd(full_run["i2e"], out, full_run["cfg"], "--mode", mode, "--max-steps", "3"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    curve = _curve(out)
    assert [r["step"] for r in curve] == [1, 2, 3]
    present = {"supervised": "loss_class", "contrastive": "loss_contrast"}[mode]
    absent = {"supervised": "loss_contrast", "contrastive": "loss_class"}[mode]
    assert all(present in r and absent not in r for r in curve)
    extra = load_checkpoint(os.path.join(out, "model.pt"))["extra"]
    assert ("entity_head" in extra) == (mode == "supervised")


def test_gradient_accumulation_in_one_process(tmp_path):
    """A plain process (no torchrun) is rank 0 of 1; 2 micro-batches per optimiser step."""
    i2e = make_i2e(tmp_path / "i2e", n_shards=2)
    cfg = _config_file(tmp_path / "cfg.json", grad_accum=2, max_steps=3)
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--i2e", i2e, "--out", out, "--config-file", cfg],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = _curve(out)
    assert [r["step"] for r in curve] == [1, 2, 3]
    assert all(r["samples_per_s"] > 0 for r in curve)


@pytest.mark.gpu
def test_cuda_bf16_training_and_eval(tmp_path):
    i2e = make_i2e(tmp_path / "i2e", n_shards=2)
    dist = recipes.cpu_test().dist.replace(device="cuda", nproc_per_node=1)
    cfg = _config_file(tmp_path / "cfg.json", precision="bf16", max_steps=4, dist=dist)
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--i2e", i2e, "--out", out, "--config-file", cfg],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_curve(out)) == 4
    images = make_eval_folder(tmp_path / "eval")
    report = run_eval(
        os.path.join(out, "model.pt"),
        images,
        str(tmp_path / "m.json"),
        EvalConfig(device="cuda", workers=0),
        results_url="",
        progress=False,
    )
    assert 0 < report["metrics"]["map"] <= 1
