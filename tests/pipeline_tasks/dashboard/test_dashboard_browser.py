"""The page in real headless Chromium (Debian's ``chromium``, driven by Playwright) while a
real build runs through the CLI (ner, scorer-bootstrap, score): a progress bar moves between
two refreshes, a shard whose raw tar is deleted before score fails there and shows up with
its reason, and a screenshot
is saved (``runs/test-artifacts/dashboard.png``, or ``$MOFI_TEST_ARTIFACTS``)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from dashboard_trees import DOMAINS, write_training

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MOFI = [sys.executable, "-m", "pipeline_tasks.cli", "-q"]
BARS_JS = """() => [...document.querySelectorAll('.bar[data-stage]')].map(b => ({
    key: b.dataset.where + ':' + b.dataset.stage, done: +b.dataset.done, total: +b.dataset.total,
    running: +b.dataset.running,
    width: (b.querySelector('.seg-done') || {style: {width: '0%'}}).style.width}))"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def raw_corpus(tiny_corpus, tmp_path):
    """96 pairs in 8 raw shards of 12 (more shards than the session corpus: a bar that moves)."""
    from pipeline_tasks.demo import corpus
    from pipeline_tasks.demo import recipes as demo_recipes

    c = demo_recipes.cpu_test().replace(
        stamps_dir=str(tiny_corpus["root"] / "pictures"),
        pairs=96,
        shard_size=12,
        holdout_min_pictures=5,
    )
    raw = str(tmp_path / "corpus" / "raw")
    corpus.build_corpus(c, raw, tiny_corpus["kb"], progress=False)
    return raw, tiny_corpus["kb"]


@pytest.fixture
def dashboard(tmp_path):
    """``mofi dashboard`` in its own process on a free port, refreshing every second."""
    root = tmp_path / "runs" / "build"
    root.mkdir(parents=True)
    results = f"sqlite:///{tmp_path}/results.sqlite"
    port = _free_port()
    cmd = [*MOFI, "dashboard", "--roots", str(root), "--results", results, "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--refresh", "1"], cwd=REPO, start_new_session=True)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(base + "api/runs", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, "mofi dashboard did not start"
        time.sleep(0.3)
    yield {"url": base, "root": root, "results": results}
    proc.terminate()
    proc.wait(timeout=20)


def _trainer(folder, stop: threading.Event) -> None:
    """Appends steps to a metrics log as a training run does (the page's training panel)."""
    step = 1
    while not stop.is_set():
        write_training(folder, 5, start=step)
        step += 5
        stop.wait(1.0)


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install --no-install-recommends chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        yield b
        b.close()


def test_page_follows_a_real_build(raw_corpus, dashboard, browser, tmp_path):
    from evaluation import results

    raw, kb = raw_corpus
    run = dashboard["root"] / "i2e_run"
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(dashboard["url"])
    page.wait_for_function("+document.body.dataset.refreshes >= 1", timeout=20_000)
    origin = page.evaluate("performance.timeOrigin")

    # the build: ner, then the raw tar of shard 00003 disappears, then the rest (score fails it)
    q = shlex.quote
    common = f"--raw {q(raw)} --kb {q(kb)} --config cpu_test --no-progress"
    mofi = shlex.join(MOFI)
    script = (
        f"{mofi} ner {common} --run {q(str(run))} && "
        f"{mofi} scorer-bootstrap {common} --run {q(str(run))} && "
        f"rm {q(os.path.join(raw, '00003.tar'))} && "
        f"{mofi} score {common} --run {q(str(run))}"
    )
    log = open(tmp_path / "build.log", "w")
    build = subprocess.Popen(["bash", "-c", script], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    trainer = threading.Thread(target=_trainer, args=(dashboard["root"] / "train", stop))
    trainer.start()
    try:
        seen: list[tuple[int, dict]] = []  # (refresh count, {stage: (done, width)}) per refresh
        last, running_shot = 0, ""
        deadline = time.time() + 480
        while build.poll() is None and time.time() < deadline:
            page.wait_for_function(f"+document.body.dataset.refreshes > {last}", timeout=20_000)
            last = int(page.evaluate("document.body.dataset.refreshes"))
            found = page.evaluate(BARS_JS)
            seen.append((last, {b["key"]: (b["done"], b["width"]) for b in found}))
            if not running_shot and any(b["running"] and b["done"] for b in found):
                running_shot = _screenshot(page, "dashboard-running.png")
        assert build.poll() is not None, "the build did not finish in time"
        log.close()
        assert build.returncode == 1, (tmp_path / "build.log").read_text()[-3000:]  # score failed
        results.append_result(
            dashboard["results"],
            {"run_id": "build", "model": "model.pt", "images": "eval",
             "metrics": {"map": 0.69, **{f"map/{d}": 0.6 + 0.05 * i for i, d in enumerate(DOMAINS)}}},
        )  # fmt: skip
        # the failed shard, with its reason, on the page
        failed = page.locator('.problem[data-problem="failed"][data-shard="00003"]')
        failed.wait_for(timeout=20_000)
        text = failed.inner_text()
        assert "score" in text and "00003.tar" in text, text
        page.locator("tr[data-result]").first.wait_for(timeout=20_000)
        page.wait_for_function(
            "document.querySelector('[data-training] [data-chart=\"loss\"]') !== null"
        )
    finally:
        stop.set()
        trainer.join()
        if build.poll() is None:
            build.kill()

    # a bar moved between two consecutive refreshes of the same page (never reloaded)
    moves = [
        (k, a[k], b[k])
        for (_, a), (_, b) in zip(seen, seen[1:], strict=False)
        for k in b
        if k in a and b[k][0] > a[k][0] and b[k][1] != a[k][1]
    ]
    assert moves, f"no progress bar moved across {len(seen)} refreshes: {seen[-3:]}"
    assert page.evaluate("performance.timeOrigin") == origin
    assert not errors, errors
    ner = page.locator('.bar[data-stage="ner"]')
    assert ner.get_attribute("data-done") == ner.get_attribute("data-total") == "8"
    score = page.locator('.bar[data-stage="score"]')
    assert score.get_attribute("data-failed") == "1"
    assert "FAILED" in page.locator('section[data-run="build"] .head .badge').inner_text().upper()

    shot = _screenshot(page, "dashboard.png")
    print(f"\nscreenshots: {shot} {running_shot} ({len(seen)} refreshes, moves: {moves[:3]})")


def _screenshot(page, name: str) -> str:
    out = os.environ.get("MOFI_TEST_ARTIFACTS") or os.path.join(REPO, "runs", "test-artifacts")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    page.screenshot(path=path, full_page=True)
    return path
