"""`make demo` / `mofi demo`: the main job end to end through a local Airflow.

1. The demo's input, as a user would bring it: the knowledge base, a noisy corpus in
   img2dataset's layout made from real pictures, and the held-out evaluation folders (the
   demo's own pictures and, out of domain, real photographs: `mofi photos`).
2. A local Airflow (``RUN/airflow``: SQLite, LocalExecutor; reused when it already runs).
3. Over the REST API: unpause the DAGs, trigger ``mofi_build_i2e``; its ``publish`` task
   updates the ``mofi_i2e`` asset, which triggers ``mofi_train`` (train, evaluate on every
   folder with the packaged backbone as the baseline, post to ``RUN/results.sqlite``).
4. Follow both runs in the terminal (task states, shards done per stage), print the posted
   mAP, the results table and chart, the UI address and where the login is, and the
   dashboard's address; then stop the services (``keep``: leave them running).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from training.core import storage

from .layout import DemoLayout

log = logging.getLogger(__name__)

BUILD, TRAIN = "mofi_build_i2e", "mofi_train"


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_inputs(layout: DemoLayout, pairs: int, seed: int) -> list[str]:
    """KB, corpus and eval folders of the demo (each step skips what is done); the folders."""
    from evaluation.layout import CLASSES_FILE
    from pipeline_tasks import recipes
    from pipeline_tasks.stages.kb.stage import ENTITIES_FILE, build_kb

    from . import corpus
    from . import recipes as demo_recipes

    kb_dir, raw = layout.kb, layout.raw
    if not storage.exists(os.path.join(kb_dir, ENTITIES_FILE)):
        st = build_kb(recipes.get("demo").kb, kb_dir)
        _say(f"kb: {st.n_out} entities -> {kb_dir}")
    c = demo_recipes.demo().replace(pairs=pairs, seed=seed)
    res = corpus.build_corpus(c, raw, kb_dir, progress=False)
    res.raise_if_failed()
    _say(f"corpus: {c.pairs} pairs in {res.shards} shards -> {raw}; eval -> {res['eval_dir']}")
    folders = [res["eval_dir"]]
    try:
        from . import photos

        out = layout.photos
        if not os.path.exists(os.path.join(out, CLASSES_FILE)):
            info = photos.write_eval_folder(out)
            _say(f"photos: {info['images']} real photographs, {info['classes']} classes -> {out}")
        folders.append(out)
    except (RuntimeError, FileNotFoundError, OSError) as exc:  # npm unreachable: one folder only
        _say(f"out-of-domain photos unavailable ({exc}); evaluating on the demo folder only")
    return folders


class Follower:
    """Prints task state changes and shards done per stage, once per change."""

    def __init__(self, dag_id: str, version_root: str | None = None):
        self.dag_id = dag_id
        self.version_root = version_root
        self.states: dict[str, str] = {}
        self.progress = ""

    def __call__(self, run: dict[str, Any], tis: list[dict[str, Any]]) -> None:
        for ti in sorted(tis, key=lambda t: (t.get("start_date") or "", t["task_id"])):
            name = ti["task_id"] + (f"[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else "")
            state = ti.get("state") or "none"
            if self.states.get(name) != state and state not in ("none", "scheduled", "queued"):
                self.states[name] = state
                _say(f"{self.dag_id}: {name} {state}")
        if self.version_root and storage.exists(self.version_root):
            from pipeline_tasks.runtime import status

            try:
                stages = status.summarize_run(self.version_root)
            except (FileNotFoundError, ValueError):
                return
            line = ", ".join(
                f"{s['stage']} {s['done']}/{s['shards_total']}" for s in stages if s["shards_total"]
            )
            if line and line != self.progress:
                self.progress = line
                _say(f"{self.dag_id}: shards done: {line}")


def run_demo(
    run: str,
    pairs: int = 5000,
    seed: int = 0,
    keep: bool = False,
    port: int | None = None,
    timeout_s: float = 3600,
) -> int:
    from pipeline_tasks.runtime.layout import VersionLayout

    layout = DemoLayout(run)
    run = layout.root
    os.makedirs(run, exist_ok=True)
    t0 = time.time()
    folders = prepare_inputs(layout, pairs, seed)
    val = layout.validation_folder()
    af = layout.local_airflow(port, eval_folders=folders, val_folder=val)
    up = af.up()
    _say(f"Airflow {'already running' if up['reused'] else 'started'} at {af.url} (home {af.home})")
    try:
        client = af.client()
        client.wait_for_dags([BUILD, TRAIN])
        for d in (BUILD, TRAIN):
            client.set_paused(d, False)
        t_trigger = time.time()
        build = client.trigger(BUILD, {"config": "demo"})
        version = (build.get("logical_date") or build.get("run_after") or "")[:10]
        version_root = VersionLayout.of(run, version).root
        _say(f"triggered {BUILD} run {build['dag_run_id']} (version {version_root})")
        done = client.wait(
            BUILD, build["dag_run_id"], timeout_s, on_poll=Follower(BUILD, version_root)
        )
        if done["state"] != "success":
            _say(f"{BUILD} {done['state']}: see `mofi status {version_root}` and the UI")
            return 1
        train = client.asset_triggered_run(TRAIN, t_trigger, timeout_s=300)
        _say(f"the mofi_i2e asset triggered {TRAIN} run {train['dag_run_id']}")
        done = client.wait(TRAIN, train["dag_run_id"], timeout_s, on_poll=Follower(TRAIN))
        if done["state"] != "success":
            _say(f"{TRAIN} {done['state']}: see the UI")
            return 1
        _report(
            layout, train["dag_run_id"], version_root, time.time() - t0, time.time() - t_trigger
        )
        _say(
            f"Airflow UI: {af.url}  (login: user admin, password in {af.passwords_file})\n"
            f"           dashboard: {af.url}/mofi/  (standalone: mofi dashboard --roots {run})"
        )
        return 0
    finally:
        if keep:
            _say(f"Airflow keeps running (stop it with `make airflow-down RUN={run}`)")
        else:
            stopped = af.down()
            _say(f"stopped Airflow services: {', '.join(stopped) or 'none'}")


def _report(
    layout: DemoLayout, train_run_id: str, version_root: str, total_s: float, airflow_s: float
):
    from evaluation import results
    from pipeline_tasks.runtime import status

    print(status.render(status.summarize_run(version_root), version_root), flush=True)
    url = layout.results_url
    rows = [r for r in results.read_results(url) if r["run_id"].startswith(train_run_id)]
    for r in rows:
        m = r["metrics"]
        _say(
            f"posted: {r['run_id']} on {os.path.basename(r['images'])}: mAP {m.get('map', 0):.4f}"
            + (f", zero-shot top-1 {m['zero_shot/top1']:.4f}" if "zero_shot/top1" in m else "")
        )
    print(results.format_table(rows), flush=True)
    if rows:
        _say(f"chart -> {results.write_chart(rows, layout.results_png)}")
    _say(f"demo finished in {total_s / 60:.1f} min ({airflow_s / 60:.1f} min through Airflow)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="mofi demo", description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--pairs", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="leave Airflow running for the UI")
    p.add_argument("--port", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run_demo(a.run, a.pairs, a.seed, a.keep, a.port)


if __name__ == "__main__":
    sys.exit(main())
