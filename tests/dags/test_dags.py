"""DAG integrity (every DAG file imports, wiring only) and a real in-process DAG run."""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline_tasks.demo.layout import DAG_FOLDER as DEMO_DAG_FOLDER

DAGS_DIR = os.environ["AIRFLOW__CORE__DAGS_FOLDER"]
DEMO_DAGS_DIR = DEMO_DAG_FOLDER  # the demo's DAG: a bundle of its own, beside dags/
ALL_DAG_DIRS = (DAGS_DIR, DEMO_DAGS_DIR)


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    bags = [DagBag(dag_folder=d) for d in ALL_DAG_DIRS]
    bags[0].import_errors.update(bags[1].import_errors)
    bags[0].dags.update(bags[1].dags)
    return bags[0]


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {"mofi_build_i2e", "mofi_train", "mofi_corpus"} <= set(dagbag.dags)


def test_the_production_dags_know_no_demo():
    """dags/ holds the production DAGs only; their params default to no demo folder and
    list the named configs the recipes define."""
    from airflow.dag_processing.dagbag import DagBag

    from pipeline_tasks import recipes
    from training import recipes as train_recipes

    bag = DagBag(dag_folder=DAGS_DIR)
    assert set(bag.dags) == {"mofi_build_i2e", "mofi_train"}
    for name in os.listdir(DAGS_DIR):
        if name.endswith(".py"):
            assert "runs/demo" not in open(os.path.join(DAGS_DIR, name)).read(), name
    build, train = bag.dags["mofi_build_i2e"], bag.dags["mofi_train"]
    assert build.params.get_param("config").schema["enum"] == list(recipes.RECIPES)
    assert train.params.get_param("config").schema["enum"] == list(train_recipes.RECIPES)


def test_the_build_dag_chains_the_stages_in_the_pipeline_order(dagbag):
    """The DAG's task order is runtime.layout.BUILD_STAGES, the list build-i2e runs."""
    from pipeline_tasks.runtime.layout import BUILD_STAGES

    dag = dagbag.dags["mofi_build_i2e"]
    first = {
        "ner": "ner",
        "score": "prepare_score",
        "hygiene": "hygiene",
        "vocab": "vocab",
        "write": "write",
    }
    order = [first[s] for s in BUILD_STAGES]
    for a, b in zip(order, order[1:], strict=False):
        assert b in {t.task_id for t in dag.get_task(a).get_flat_relatives(upstream=False)}, (a, b)


def test_dags_are_tagged_documented_and_unscheduled_by_default(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert "mofi" in dag.tags, dag_id
        assert dag.doc_md, dag_id
        assert not dag.catchup, dag_id


def test_dag_files_do_no_work_at_import():
    """No I/O, Variable or connection lookups, or now() at module top level, decorators
    included (STYLE.md, item 1). Reading an environment variable (a deployment setting) is
    allowed: it does no I/O."""
    banned = {"open", "now", "utcnow", "today", "read_text", "listdir", "exists", "scandir"}
    for name in [os.path.join(d, f) for d in ALL_DAG_DIRS for f in os.listdir(d)]:
        if not name.endswith(".py"):
            continue
        source = open(name).read()
        tree = ast.parse(source)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                parts = list(node.decorator_list)  # a DAG's params and schedule live here
            else:
                parts = [node]
            for part in parts:
                for sub in ast.walk(part):
                    if not isinstance(sub, ast.Call):
                        continue
                    fn = sub.func
                    called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                    owner = ast.unparse(fn.value) if isinstance(fn, ast.Attribute) else ""
                    assert called not in banned, f"{name}: top-level call {called}()"
                    if called == "get":
                        assert owner == "os.environ", f"{name}: top-level {owner}.get()"
        assert "Variable" not in source and "get_connection" not in source, name


def test_every_task_has_an_owner_retries_with_backoff_and_a_timeout(dagbag):
    for dag_id, dag in dagbag.dags.items():
        for t in dag.tasks:
            where = f"{dag_id}.{t.task_id}"
            assert t.owner and t.owner != "airflow", where
            assert t.retries >= 1 and t.retry_exponential_backoff, where
            assert t.execution_timeout is not None, where


def test_scoring_is_mapped_in_the_gpu_pool(dagbag):
    dag = dagbag.dags["mofi_build_i2e"]
    score = dag.get_task("score")
    assert score.pool == "gpu" and score.pool_slots == 1
    assert type(score).__name__.endswith("MappedOperator")
    train = dagbag.dags["mofi_train"]
    assert type(train.get_task("train")).__name__.endswith("MappedOperator")
    assert type(train.get_task("evaluate")).__name__.endswith("MappedOperator")


def test_params_are_validated_by_their_schema(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["mofi_build_i2e"]

    def check(conf):
        params = copy.deepcopy(dag.params)
        for k, v in conf.items():
            params[k] = v  # a Param checks its value against its schema here ...
        params.validate()  # ... and every value is checked again here

    good = {"root": "/r", "raw": "/raw", "kb": "/kb", "config": "cpu_test", "threshold": 0.3}
    check(good)
    check({**good, "eval_folders": ["/e1", "s3://b/e2"]})
    for bad in (
        {"config": "nope"},
        {"threshold": 1.5},
        {"score_batch_shards": 0},
        {"root": ""},
        {"eval_folders": "/e1"},
        {"eval_folders": [""]},
    ):
        with pytest.raises(ParamValidationError):
            check({**good, **bad})


def test_map_sizes_stay_within_airflow_bounds(tmp_path):
    from pipeline_tasks.orchestration.dag_tasks import MAX_MAP, shard_batches
    from pipeline_tasks.runtime.layout import RunLayout

    run = str(tmp_path / "run")
    ids = [f"{i:05d}" for i in range(5000)]
    RunLayout(run).store("score").write_plan(ids)
    batches = shard_batches(run, 1)
    assert len(batches) <= MAX_MAP
    assert sorted(s for b in batches for s in b.split(",")) == ids  # every shard once
    assert max(len(b.split(",")) for b in batches) == 5  # ceil(5000 / 1024)
    assert len(shard_batches(run, 2000)) == 3


def test_the_first_task_names_what_to_fix(tmp_path, tiny_corpus):
    from pipeline_tasks.orchestration.dag_tasks import check_build_params
    from training.core.config import ConfigError

    good = {
        "config": "cpu_test",
        "raw": tiny_corpus["raw"],
        "kb": tiny_corpus["kb"],
        "root": str(tmp_path / "out"),
        "threshold": None,
        "score_batch_shards": 2,
    }
    assert check_build_params(good)["raw_shards"] == 4
    with pytest.raises(ConfigError, match="raw input not found: .*nope"):
        check_build_params({**good, "raw": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="no knowledge base"):
        check_build_params({**good, "kb": str(tmp_path)})
    with pytest.raises(ConfigError, match="unknown config"):
        check_build_params({**good, "config": "prod"})
    with pytest.raises(ConfigError, match="eval_folders: no images in .*nope"):
        check_build_params({**good, "eval_folders": [str(tmp_path / "nope")]})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write to"):
        check_build_params({**good, "root": str(tmp_path / "file" / "out")})


def test_the_train_dag_checks_its_validation_params(tmp_path):
    from mofi_testdata import make_eval_folder

    from pipeline_tasks.orchestration.dag_tasks import check_train_params
    from training.core.config import ConfigError

    good = {
        "config": "demo",
        "root": str(tmp_path / "train"),
        "images": make_eval_folder(tmp_path / "eval"),
        "val": make_eval_folder(tmp_path / "val", seed=5),
        "wise_alphas": "0,0.5,1",
    }
    check_train_params(good)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="validation folder .*empty has no images"):
        check_train_params({**good, "val": str(tmp_path / "empty")})
    # WiSE-FT of random-init towers would fail only after training: refused first
    with pytest.raises(ConfigError, match="'cpu_test' the image tower .* random init"):
        check_train_params({**good, "config": "cpu_test"})
    check_train_params({**good, "config": "cpu_test", "val": ""})
    for bad in ("0,1.5", "0,x"):
        with pytest.raises(ConfigError, match="wise_alphas .*in \\[0, 1\\]"):
            check_train_params({**good, "wise_alphas": bad})


@pytest.fixture(scope="module")
def migrated_db():
    """The session's SQLite metadata DB, created once by the real `airflow db migrate`."""
    migrate = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "airflow"), "db", "migrate"],
        capture_output=True,
        text=True,
    )
    assert migrate.returncode == 0, migrate.stderr[-2000:]


@pytest.mark.slow
def test_corpus_dag_runs_end_to_end(tmp_path, picture_folder, migrated_db):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=DEMO_DAGS_DIR).dags["mofi_corpus"]
    root = tmp_path / "af"
    run = dag.test(
        run_conf={
            "root": str(root),
            "config": "cpu_test",
            "pairs": 20,
            "stamps": str(picture_folder),
        }
    )
    assert run.state == "success"
    (version,) = os.listdir(root)
    assert version.startswith("v=")
    raw = root / version / "raw"
    assert sorted(f for f in os.listdir(raw) if f.endswith(".tar")) == ["00000.tar", "00001.tar"]
    assert (root / version / "kb" / "entities.parquet").exists()


@pytest.mark.slow
def test_build_i2e_dag_runs_end_to_end(tmp_path, tiny_corpus, migrated_db):
    """A first version, then a weekly-style rebuild with the defaults: the second run
    finds the first on the mofi_i2e asset and computes only the re-crawled shard."""
    from airflow.dag_processing.dagbag import DagBag
    from mofi_testdata import copy_raw_shard

    from pipeline_tasks.runtime.layout import NER, SCORE, RunLayout

    dag = DagBag(dag_folder=DAGS_DIR).dags["mofi_build_i2e"]
    root, raw = tmp_path / "af", tmp_path / "raw"
    shutil.copytree(tiny_corpus["raw"], raw, ignore=shutil.ignore_patterns("_markers"))
    conf = {"root": str(root), "raw": str(raw), "kb": tiny_corpus["kb"], "config": "cpu_test"}
    run = dag.test(run_conf={**conf, "version": "one", "reuse_from": "none"})
    assert run.state == "success"
    i2e = root / "v=one" / "i2e"
    assert (i2e / "sizes.json").exists() and (i2e / "vocab.parquet").exists()
    assert any(f.endswith(".tar") for f in os.listdir(i2e))

    copy_raw_shard(raw, "00001", drop_last=2)  # re-crawled: same name, other bytes
    # a freshly parsed DAG: dag.test() leaves the first run's conf in the DAG object's params
    dag = DagBag(dag_folder=DAGS_DIR).dags["mofi_build_i2e"]
    run = dag.test(run_conf={**conf, "version": "two"})
    assert run.state == "success"
    two = RunLayout(str(root / "v=two" / "i2e_run"))
    for stage in (NER, SCORE):
        done = {s: r for s, r in two.store(stage).read_all().items() if r["state"] == "done"}
        computed = sorted(s for s, r in done.items() if not r.get("reused_from"))
        assert computed == ["00001"], stage
        assert {r["reused_from"]["from"] for s, r in done.items() if s != "00001"} == {"v=one"}
    assert (root / "v=two" / "i2e" / "sizes.json").exists()


@pytest.mark.slow
def test_build_i2e_dag_with_the_production_recipe(tmp_path, tiny_corpus, migrated_db):
    """config=production: open_clip scoring (a tiny random-init model stands in for
    ViT-B-32), no packaged-scorer bootstrap, the recipe's top-k, every hygiene part on with
    the evaluation folders the trigger names."""
    from airflow.dag_processing.dagbag import DagBag
    from mofi_testdata import make_eval_folder

    dag = DagBag(dag_folder=DAGS_DIR).dags["mofi_build_i2e"]
    root = tmp_path / "af"
    run = dag.test(
        run_conf={
            "root": str(root),
            "raw": tiny_corpus["raw"],
            "kb": tiny_corpus["kb"],
            "config": "production",
            "score_model": "mofi-tiny-vit",
            "threshold": -1.0,
            "eval_folders": [make_eval_folder(tmp_path / "eval folder")],  # quoted in bash
        }
    )
    assert run.state == "success"
    (version,) = os.listdir(root)
    work = root / version / "i2e_run"
    hyg = json.loads((work / "hygiene" / "hygiene.config.json").read_text())
    assert hyg["eval_folders"] == [str(tmp_path / "eval folder")] and hyg["nsfw"]
    assert not (work / "scorer").exists()  # open_clip needs no bootstrap
    saved = json.loads((work / "score" / "score.config.json").read_text())
    assert saved["backend"] == "open_clip" and saved["model"] == "mofi-tiny-vit"
    assert json.loads((work / "vocab" / "vocab.config.json").read_text())["top_k"] == 3
    i2e = root / version / "i2e"
    assert json.loads((i2e / "_info.json").read_text())["num_samples"] > 0


@pytest.mark.slow
def test_train_dag_trains_evaluates_and_posts(tmp_path, migrated_db):
    from airflow.dag_processing.dagbag import DagBag
    from mofi_testdata import make_eval_folder, make_i2e

    from evaluation.results import read_results

    dag = DagBag(dag_folder=DAGS_DIR).dags["mofi_train"]
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["mofi_i2e"]
    i2e = make_i2e(tmp_path / "i2e")
    images = make_eval_folder(tmp_path / "eval")
    db = f"sqlite:///{tmp_path}/results.sqlite"
    run = dag.test(
        run_conf={
            "i2e": i2e,
            "root": str(tmp_path / "train"),
            "config": "cpu_test",
            "images": images,
            "results": db,
        }
    )
    assert run.state == "success"
    (run_dir,) = os.listdir(tmp_path / "train")
    assert os.path.exists(tmp_path / "train" / run_dir / "model.pt")
    # no validation folder, no baseline asked for: those tasks are skipped by Airflow itself
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["train"] == states["evaluate"] == "success"
    assert states["wise_ft"] == states["evaluate_wise"] == "skipped"
    assert states["evaluate_baseline"] == "skipped"
    rows = read_results(db)
    assert len(rows) == 1 and 0 < rows[0]["metrics"]["map"] <= 1


@pytest.mark.slow
def test_train_dag_with_a_validation_folder_runs_wise_ft(tmp_path, migrated_db):
    """params.val set: WiSE-FT's curve on the validation folder, the mix at the chosen alpha
    evaluated and posted beside the fine-tuned model; the baseline too when asked. (Until
    this test ran it, wise_ft with the test config failed only after training, three times.)"""
    from airflow.dag_processing.dagbag import DagBag
    from mofi_testdata import make_eval_folder, make_i2e

    from evaluation.results import read_results

    dag = DagBag(dag_folder=DAGS_DIR).dags["mofi_train"]
    db = f"sqlite:///{tmp_path}/results.sqlite"
    run = dag.test(
        run_conf={
            "i2e": make_i2e(tmp_path / "i2e"),
            "root": str(tmp_path / "train"),
            "config": "demo",  # pretrained (packaged) towers: WiSE-FT has weights to mix
            "images": make_eval_folder(tmp_path / "eval"),
            "val": make_eval_folder(tmp_path / "val", seed=5),
            "wise_alphas": "0,0.5,1",
            "baseline": True,
            "results": db,
        }
    )
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    assert {states[t] for t in ("train", "evaluate", "wise_ft", "evaluate_wise",
                                "evaluate_baseline")} == {"success"}  # fmt: skip
    (run_dir,) = os.listdir(tmp_path / "train")
    files = {f for _, _, fs in os.walk(tmp_path / "train" / run_dir) for f in fs}
    assert "model.pt" in files and any("wise" in f for f in files), sorted(files)
    models = sorted(r["model"] for r in read_results(db))
    assert len(models) == 3 and any("wise" in m for m in models), models
