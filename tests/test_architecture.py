"""The layout's import rules: packages import downward only, the demo is a user of the system.

* ``training`` never imports ``pipeline_tasks``, ``evaluation``, Airflow or Spark;
* ``evaluation`` never imports ``pipeline_tasks`` or the trainer (``training.train``);
* nothing imports ``dags``;
* production code never imports ``pipeline_tasks.demo``; only the CLI's demo commands
  (``mofi corpus``, ``mofi fetch-stamps``, ``mofi config ... corpus:NAME``) load it, when they run.

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
    allow = demo | {"pipeline_tasks.cli"}
    assert _violations("pipeline_tasks", ("pipeline_tasks.demo",), allow) == []
    # and importing every production module (the CLI included) leaves the demo unloaded
    prod = sorted(m for m in _modules("pipeline_tasks") if m not in demo)
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
