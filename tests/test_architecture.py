"""The layout's import rules: packages import downward only, the demo is a user of the system.

* ``training`` never imports ``pipeline_tasks``, ``evaluation``, Airflow or Spark;
* ``evaluation`` never imports ``pipeline_tasks`` or the trainer (``training.train``);
* nothing imports ``dags``;
* production code never imports ``pipeline_tasks.demo``; only the CLI's demo commands
  (``pipeline_tasks.cli.demo``: ``mofi corpus``, ``mofi demo``, ...) load it, when they run;
* a stage (``pipeline_tasks.stages.<stage>``) imports only the stages before it (the order of
  ``runtime.layout.STAGES``) and ``pipeline_tasks.runtime``; the runtime imports no stage;
* nothing imports the CLI;
* production code never imports ``pipeline_tasks.cluster`` (the deployment run on namespace
  hosts, a user of the system like the demo); only ``mofi cluster`` loads it;
* no module is over 500 lines, no function over 100.

Imports are read from the source (every ``import`` statement, also inside functions), so a
lazy import breaks a rule as surely as a top-level one.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(module: str, path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    pkg = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


def _violations(package: str, banned: tuple[str, ...], allow: set[str] = frozenset()):
    bad = []
    for module, path in _modules(package).items():
        if module in allow:
            continue
        for name in _imports(module, path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{module} imports {name}")
    return sorted(bad)


def test_training_imports_nothing_above_it():
    assert (
        _violations("training", ("pipeline_tasks", "evaluation", "airflow", "pyspark", "dags"))
        == []
    )


def test_evaluation_imports_neither_the_pipeline_nor_the_trainer():
    assert _violations("evaluation", ("pipeline_tasks", "training.train", "airflow", "dags")) == []


def test_nothing_imports_dags():
    for package in ("pipeline_tasks", "training", "evaluation"):
        assert _violations(package, ("dags",)) == []


def test_production_code_never_imports_the_demo():
    demo = {m for m in _modules("pipeline_tasks") if m.startswith("pipeline_tasks.demo")}
    allow = demo | {"pipeline_tasks.cli.demo"}
    assert _violations("pipeline_tasks", ("pipeline_tasks.demo",), allow) == []
    # and importing every production module (the CLI included) leaves the demo unloaded
    prod = sorted(
        m for m in _modules("pipeline_tasks") if m not in demo and not m.endswith("__main__")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {prod!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith('pipeline_tasks.demo')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_checks_catch_a_violation(tmp_path):
    """The rule reader sees relative and lazy imports (else the tests above could not fail)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "m.py").write_text("def f():\n    from ..demo import corpus\n")
    names = _imports("pkg.sub.m", str(pkg / "sub" / "m.py"))
    assert "pkg.demo" in names and "pkg.demo.corpus" in names


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def test_stages_import_only_earlier_stages_and_the_runtime():
    from pipeline_tasks.runtime.layout import STAGES

    order = [name for name, _ in STAGES]
    assert sorted(order) == sorted(
        d
        for d in os.listdir(os.path.join(ROOT, "pipeline_tasks", "stages"))
        if os.path.isdir(os.path.join(ROOT, "pipeline_tasks", "stages", d)) and d[0] != "_"
    ), "every stage package is in runtime.layout.STAGES"
    bad = []
    for module, path in _modules("pipeline_tasks").items():
        stage = _stage_of(module)
        if stage is None:
            continue
        allowed = {f"pipeline_tasks.stages.{s}" for s in order[: order.index(stage) + 1]}
        allowed |= {"pipeline_tasks.runtime", "pipeline_tasks.stages"}
        for name in _imports(module, path):
            if not name.startswith("pipeline_tasks"):
                continue
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{module} imports {name}")
    assert sorted(bad) == []


def test_the_runtime_imports_no_stage_nor_anything_above_it():
    above = tuple(
        f"pipeline_tasks.{p}"
        for p in ("stages", "orchestration", "dashboard", "cli", "demo", "build", "recipes")
    )
    bad = [
        v for v in _violations("pipeline_tasks", above) if v.startswith("pipeline_tasks.runtime")
    ]
    assert bad == []


def test_nothing_imports_the_cli():
    cli = {m for m in _modules("pipeline_tasks") if m.startswith("pipeline_tasks.cli")}
    assert _violations("pipeline_tasks", ("pipeline_tasks.cli",), cli) == []
    for package in ("training", "evaluation", "dags"):
        assert _violations(package, ("pipeline_tasks.cli",)) == []


def test_modules_and_functions_stay_small():
    """No module over 500 lines, no function over 100: a module is one job, a function one step."""
    big = []
    for package in ("pipeline_tasks", "training", "evaluation", "dags"):
        for module, path in _modules(package).items():
            src = open(path).read()
            if src.count("\n") > 500:
                big.append(f"{module}: {src.count(chr(10))} lines")
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 100:
                        big.append(f"{module}.{node.name}: {n} lines")
    assert big == []


def test_production_code_never_imports_the_cluster_run():
    cluster = {m for m in _modules("pipeline_tasks") if m.startswith("pipeline_tasks.cluster")}
    allow = cluster | {"pipeline_tasks.cli.operations"}
    assert _violations("pipeline_tasks", ("pipeline_tasks.cluster",), allow) == []
    for package in ("training", "evaluation", "dags"):
        assert _violations(package, ("pipeline_tasks.cluster",)) == []
