"""docker/compose.yaml, the deployment: validated by a real compose parser and checked
against the repository, the Airflow 3.3.2 CLI and configuration, and the deployment's own
extra packages. No Docker engine is needed.

* Debian's ``docker-compose`` (1.29) runs ``config`` on the file with docker/.env.example:
  it must accept the file, and refuse it when the env file gives no secrets. Everything
  else reads its normalised output (anchors merged, variables interpolated).
* Every build context, Dockerfile, COPY source and bind-mounted path exists; the images'
  .dockerignore files keep the virtualenv out of the build context.
* Every command, entrypoint and healthcheck that runs ``mofi``, ``airflow``, ``celery
  --app``, ``python -c`` or Spark's launcher names something real: ``mofi`` argv is parsed
  by pipeline_tasks.cli's parser, ``airflow`` argv by Airflow's own CLI parser (unknown
  subcommands and options fail) in the service's own environment, with
  docker/requirements-deploy.txt installed next to the project's venv (the Celery provider
  brings ``airflow celery``), the Celery app is imported, Python snippets compile, and the
  Spark classes exist in pyspark's jars.
* Every AIRFLOW__SECTION__KEY variable is a real option of Airflow 3.3.2 or its providers;
  the SQLAlchemy URLs load their dialect and driver (sync and, for Airflow, async); the
  Spark provider resolves ``spark_default`` to the spark-master service.
* The wiring: the api-server, scheduler, dag-processor, triggerer and Celery workers exist,
  share one JWT secret, reach the api-server, Postgres and Redis by service name; the init
  service migrates the DB and creates the ``gpu`` pool; the GPU worker reserves NVIDIA
  devices and has CUDA torch; Spark is the official apache/spark image at the pyspark
  version of requirements.txt; no Bitnami or minio/minio image; every service that runs
  pipeline code gets the S3 endpoint and keys.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from urllib.parse import urlparse

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKER = os.path.join(ROOT, "docker")
COMPOSE = os.path.join(DOCKER, "compose.yaml")
ENV_EXAMPLE = os.path.join(DOCKER, ".env.example")
DEPLOY_REQUIREMENTS = os.path.join(DOCKER, "requirements-deploy.txt")
PROFILES = ("gpu", "flower", "tools")
# Where the project lives inside the images built from docker/ (WORKDIR in the Dockerfiles).
IMAGE_ROOT = "/opt/mofi"
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "POSTGRES_PASSWORD",
    "REDISCLI_AUTH",
    "AIRFLOW_ADMIN_PASSWORD",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
)
AIRFLOW_COMPONENTS = {
    ("api-server",): "api-server",
    ("scheduler",): "scheduler",
    ("dag-processor",): "dag-processor",
    ("triggerer",): "triggerer",
    ("celery", "worker"): "worker",
}


# --------------------------------------------------------------------------- compose parser


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose not found: these tests validate docker/compose.yaml with Debian's "
            "docker-compose 1.29 (`apt-get install -y docker-compose`, which `make setup` does)"
        )
    return exe


def _compose_config(env_file: str) -> subprocess.CompletedProcess:
    cmd = [_docker_compose()]
    for p in PROFILES:
        cmd += ["--profile", p]
    cmd += ["-f", COMPOSE, "--env-file", env_file, "config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW", "MOFI_"))}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def config() -> dict:
    proc = _compose_config(ENV_EXAMPLE)
    assert proc.returncode == 0, (
        f"docker-compose config rejected docker/compose.yaml:\n{proc.stderr}"
    )
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def services(config) -> dict:
    return config["services"]


def test_compose_config_accepts_the_file(services):
    assert set(services) >= {
        "postgres",
        "redis",
        "s3",
        "spark-master",
        "spark-worker",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "airflow-worker-gpu",
    }


def test_secrets_come_from_the_env_file(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = _compose_config(str(empty))
    assert proc.returncode != 0, "docker/compose.yaml has a default for a secret"
    assert "in the env file" in proc.stderr, proc.stderr
    # and no literal secret in the file itself: each is a ${VARIABLE} reference
    with open(COMPOSE) as f:
        raw = yaml.safe_load(f)
    for name, svc in raw["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: write environment as a mapping"
        for key in SECRET_ENV:
            if key in env:
                assert str(env[key]).startswith("${"), f"{name}: {key} is hard-coded"
        for key, value in env.items():
            if "://" in str(value) and "@" in str(value):
                assert "${POSTGRES_PASSWORD" in value or "${REDIS_PASSWORD" in value, (
                    f"{name}: {key} has a literal password"
                )


# --------------------------------------------------------------------------- images, paths


def _dockerfile_path(svc: dict) -> str | None:
    build = svc.get("build")
    if not build:
        return None
    if isinstance(build, str):
        build = {"context": build}
    return os.path.join(build["context"], build.get("dockerfile", "Dockerfile"))


def _dockerfile_instructions(path: str) -> list[tuple[str, str]]:
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_from(path: str) -> list[str]:
    froms = []
    for word, rest in _dockerfile_instructions(path):
        if word == "FROM":
            froms.append(rest.split()[0])
    return froms


def _exec_form(rest: str) -> list[str] | None:
    try:
        value = json.loads(rest)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def _image_default(path: str, word: str) -> list[str] | None:
    value = None
    for w, rest in _dockerfile_instructions(path):
        if w == word:
            value = _exec_form(rest)
            assert value is not None, f"{path}: write {word} in exec (JSON) form"
    return value


def _built_services(services):
    for name, svc in services.items():
        path = _dockerfile_path(svc)
        if path:
            yield name, svc, path


def _dockerignore_patterns(dockerfile: str, context: str) -> list[str]:
    for candidate in (dockerfile + ".dockerignore", os.path.join(context, ".dockerignore")):
        if os.path.exists(candidate):
            with open(candidate) as f:
                return [ln.strip().rstrip("/") for ln in f if ln.strip() and not ln.startswith("#")]
    return []


def test_build_contexts_dockerfiles_and_copy_sources_exist(services):
    built = list(_built_services(services))
    assert built, "no service is built from the repository"
    for name, svc, dockerfile in built:
        context = svc["build"]["context"]
        assert os.path.isdir(context), f"{name}: build context {context} missing"
        assert os.path.isfile(dockerfile), f"{name}: {dockerfile} missing"
        ignored = _dockerignore_patterns(dockerfile, context)
        assert ".venv" in ignored, f"{dockerfile}: the .dockerignore must keep .venv out"
        for word, rest in _dockerfile_instructions(dockerfile):
            if word not in ("COPY", "ADD"):
                continue
            args = _exec_form(rest) or rest.split()
            args = [a for a in args if not a.startswith("--")]
            for src in args[:-1]:
                full = os.path.join(context, src)
                assert os.path.exists(full), f"{dockerfile}: COPY source {src} missing"
                for pat in ignored:
                    assert not fnmatch.fnmatch(src.rstrip("/"), pat), (
                        f"{dockerfile}: COPY source {src} is excluded by .dockerignore ({pat})"
                    )


def test_bind_mounts_exist(services):
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            if isinstance(vol, dict):
                kind, source = vol.get("type"), vol.get("source")
            else:
                source = vol.split(":")[0]
                kind = "bind" if source.startswith(("/", ".")) else "volume"
            if kind == "bind":
                assert os.path.exists(source), f"{name}: mounted path {source} missing"


def _all_images(services) -> list[tuple[str, str]]:
    out = []
    for name, svc in services.items():
        if svc.get("image"):
            out.append((name, svc["image"]))
        path = _dockerfile_path(svc)
        if path:
            out += [(name, f) for f in _dockerfile_from(path)]
    return out


def _pin(requirements: str, package: str) -> str:
    with open(os.path.join(ROOT, requirements)) as f:
        for line in f:
            m = re.match(rf"{re.escape(package)}==(\S+)", line.strip())
            if m:
                return m.group(1)
    raise AssertionError(f"{package} is not pinned in {requirements}")


def _argv(svc: dict) -> list[str]:
    """What the container runs: compose's entrypoint/command over the image's defaults."""
    path = _dockerfile_path(svc)
    image_entry = _image_default(path, "ENTRYPOINT") if path else None
    image_cmd = _image_default(path, "CMD") if path else None
    command = svc.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    if "entrypoint" in svc:
        entry = svc["entrypoint"]
        entry = shlex.split(entry) if isinstance(entry, str) else list(entry or [])
        return entry + list(command or [])
    return list(image_entry or []) + list(command if command is not None else image_cmd or [])


def _spark_services(services) -> dict[str, str]:
    """service -> the Spark class it launches through spark-class."""
    out = {}
    for name, svc in services.items():
        argv = _argv(svc)
        if argv and os.path.basename(argv[0]) == "spark-class":
            out[name] = argv[1]
    return out


def test_spark_is_the_official_image_at_the_pyspark_version(services):
    spark = _spark_services(services)
    assert "org.apache.spark.deploy.master.Master" in spark.values()
    assert "org.apache.spark.deploy.worker.Worker" in spark.values()
    pyspark = _pin("requirements.txt", "pyspark")
    for name in spark:
        svc = services[name]
        path = _dockerfile_path(svc)
        images = _dockerfile_from(path) if path else [svc["image"]]
        for image in images:
            assert image.startswith("apache/spark:"), f"{name}: {image} is not apache/spark"
            version = image.split(":", 1)[1].split("-")[0]
            assert version == pyspark, (
                f"{name}: Spark {version} in the cluster, pyspark {pyspark} in the driver"
            )


def test_no_bitnami_or_minio_image_and_third_party_images_pinned(services):
    for name, image in _all_images(services):
        assert "bitnami" not in image.lower(), f"{name}: {image}"
        assert not image.lower().startswith(("minio/minio", "quay.io/minio")), f"{name}: {image}"
        if _dockerfile_path(services[name]) is None:
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"{name}: pin a version of {image}"


# --------------------------------------------------------------------------- commands


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: lines, split at &&, ||, ;, |."""
    script = script.replace("$$", "$").replace("\\\n", " ")
    out: list[list[str]] = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        current: list[str] = []
        for tok in lex:
            if tok and set(tok) <= set(";&|"):
                out.append(current)
                current = []
            else:
                current.append(tok)
        out.append(current)
    commands = []
    for cmd in out:
        while cmd and (cmd[0] == "exec" or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0])):
            cmd = cmd[1:]
        if cmd and cmd[0] not in ("set", "export"):
            commands.append(cmd)
    return commands


def _expand(argv: list[str]) -> list[list[str]]:
    argv = [a.replace("$$", "$") for a in argv]
    if len(argv) >= 3 and os.path.basename(argv[0]) in ("bash", "sh") and argv[1] == "-c":
        return _shell_commands(argv[2])
    return [argv]


def _service_commands(svc: dict) -> list[list[str]]:
    cmds = _expand(_argv(svc))
    test = (svc.get("healthcheck") or {}).get("test")
    if isinstance(test, str):
        cmds += _shell_commands(test)
    elif test and test[0] == "CMD":
        cmds += _expand(test[1:])
    elif test and test[0] == "CMD-SHELL":
        cmds += _shell_commands(test[1])
    return cmds


def _by_program(services, program: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for name, svc in services.items():
        for cmd in _service_commands(svc):
            if cmd and os.path.basename(cmd[0]) == program:
                out.setdefault(name, []).append(cmd[1:])
    return out


def _component(args: list[str]) -> str | None:
    for prefix, component in AIRFLOW_COMPONENTS.items():
        if tuple(args[: len(prefix)]) == prefix:
            return component
    return None


def test_every_airflow_component_runs(services):
    main = {
        name: _component(_expand(_argv(svc))[-1][1:])
        for name, svc in services.items()
        if _expand(_argv(svc))[-1][:1] == ["airflow"]
    }
    assert set(main.values()) >= set(AIRFLOW_COMPONENTS.values()), main
    init = [
        name
        for name, cmds in _by_program(services, "airflow").items()
        if ["db", "migrate"] in [c[:2] for c in cmds]
    ]
    assert init, "no service runs `airflow db migrate`"
    pools = [
        c for c in _by_program(services, "airflow")[init[0]] if c[:3] == ["pools", "set", "gpu"]
    ]
    assert pools and int(pools[0][3]) >= 1, "the init service must create the gpu pool"
    for name in main:
        cond = (services[name].get("depends_on") or {}).get(init[0], {}).get("condition")
        assert cond == "service_completed_successfully", f"{name} must wait for {init[0]}"


def test_mofi_commands_parse(services):
    from pipeline_tasks.cli import build_parser

    runs = _by_program(services, "mofi")
    assert runs, "no service runs the mofi CLI"
    for name, argvs in runs.items():
        for argv in argvs:
            try:
                build_parser().parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"{name}: `mofi {' '.join(argv)}` does not parse (exit {e.code})")


def test_python_snippets_compile(services):
    for name, svc in services.items():
        for cmd in _service_commands(svc):
            if cmd and os.path.basename(cmd[0]).startswith("python") and "-c" in cmd:
                code = cmd[cmd.index("-c") + 1]
                compile(code, f"<{name}: python -c>", "exec")


def test_project_paths_named_in_the_environment_exist(services):
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if isinstance(value, str) and value.startswith(IMAGE_ROOT + "/"):
                rel = value[len(IMAGE_ROOT) + 1 :]
                top = rel.split("/")[0]
                if top in ("runs", ".venv"):
                    continue
                assert os.path.exists(os.path.join(ROOT, rel)), f"{name}: {key}={value}"
                copies = [
                    r
                    for w, r in _dockerfile_instructions(_dockerfile_path(svc))
                    if w == "COPY" and r.split()[0].rstrip("/") == top
                ]
                assert copies, f"{name}: {key} names {rel}, which the image does not copy"


def test_spark_launcher_and_classes_exist(services):
    import pyspark

    home = os.path.dirname(pyspark.__file__)
    jars = [os.path.join(home, "jars", j) for j in os.listdir(os.path.join(home, "jars"))]
    core = [j for j in jars if os.path.basename(j).startswith("spark-core_")]
    assert core, "pyspark ships no spark-core jar"
    with zipfile.ZipFile(core[0]) as z:
        classes = set(z.namelist())
    for name, svc in services.items():
        argv = _argv(svc)
        if argv and os.path.basename(argv[0]) == "spark-class":
            assert os.path.exists(os.path.join(home, "bin", "spark-class")), argv[0]
            cls = argv[1].replace(".", "/") + ".class"
            assert cls in classes, f"{name}: {argv[1]} is not a Spark class"


# --------------------------------------------------------------------------- the deploy env


@pytest.fixture(scope="module")
def deploy_site(tmp_path_factory) -> str:
    """docker/requirements-deploy.txt installed beside the venv (what the images add)."""
    target = str(tmp_path_factory.mktemp("deploy-site"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target]
        + ["-r", DEPLOY_REQUIREMENTS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"pip could not install requirements-deploy.txt:\n{proc.stderr}"
    return target


def test_deploy_requirements_resolve_against_the_lock(tmp_path):
    """What the Dockerfiles install after `make setup`: exact pins, nothing in the venv moves."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--report", str(report)]
        + ["-r", DEPLOY_REQUIREMENTS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"requirements-deploy.txt does not resolve:\n{proc.stderr}"
    with open(DEPLOY_REQUIREMENTS) as f:
        pins = {
            m.group(1).lower().replace("_", "-"): m.group(2)
            for m in (re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", ln.strip()) for ln in f)
            if m
        }
    from importlib import metadata

    for item in json.loads(report.read_text())["install"]:
        name = item["metadata"]["name"].lower().replace("_", "-")
        version = item["metadata"]["version"]
        assert pins.get(name) == version, f"{name}=={version} is installed but not pinned"
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        pytest.fail(f"requirements-deploy.txt would move {name} {have} -> {version}")
    for name in ("apache-airflow-providers-celery", "psycopg2-binary", "asyncpg"):
        assert name in pins, f"the deployment needs {name}"


PROBE = r"""
import contextlib, importlib, io, json, os, sys
req = json.load(sys.stdin)
out = {"errors": []}
err = out["errors"].append
try:
    from airflow.configuration import conf
    import airflow.settings  # builds the sync and async metadata engines: needs their drivers
except Exception as e:
    err(f"importing airflow: {e!r}")
    print(json.dumps(out))
    sys.exit(0)
desc = conf.configuration_description
for key in sorted(os.environ):
    if key.startswith("AIRFLOW__"):
        parts = key.split("__")
        section, option = parts[1].lower(), parts[2].lower()
        if section not in desc or option not in desc[section]["options"]:
            err(f"{key}: no option [{section}] {option} in Airflow's configuration")
from airflow.cli.cli_parser import get_parser
for argv in req["airflow"]:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            get_parser().parse_args(argv)
    except SystemExit as e:
        last = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-1:]
        err(f"airflow {' '.join(argv)}: exit {e.code}: {last}")
for app in req["celery_apps"]:
    module, _, attr = app.rpartition(".")
    try:
        getattr(importlib.import_module(module), attr)
    except Exception as e:
        err(f"celery --app {app}: {e!r}")
from sqlalchemy.engine import make_url
for url in req["sql_urls"]:
    try:
        make_url(url.removeprefix("db+")).get_dialect().import_dbapi()
    except Exception as e:
        err(f"{make_url(url.removeprefix('db+')).drivername}: {e!r}")
if os.environ.get("AIRFLOW_CONN_SPARK_DEFAULT"):
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
    out["spark_master"] = SparkSubmitHook(conn_id="spark_default")._connection["master"]
print(json.dumps(out))
"""


def _airflow_services(services) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in services.items()
        if (svc.get("environment") or {}).get("AIRFLOW__CORE__EXECUTOR")
    }


def _probe(env: dict, site: str, home: str, request: dict) -> dict:
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "LANG": "C.UTF-8"}
    run_env.update({k: str(v) for k, v in env.items()})
    run_env.update({"AIRFLOW_HOME": home, "PYTHONPATH": site})
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=run_env,
        cwd=home,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes(services, deploy_site, tmp_path_factory) -> dict[str, dict]:
    """Each Airflow service's environment, tried on the real Airflow with the deploy extras."""
    airflow_runs = _by_program(services, "airflow")
    celery_runs = _by_program(services, "celery")
    groups: dict[str, list[str]] = {}
    for name, svc in _airflow_services(services).items():
        key = json.dumps(svc["environment"], sort_keys=True)
        groups.setdefault(key, []).append(name)
    results = {}
    for key, names in groups.items():
        env = json.loads(key)
        request = {
            "airflow": [argv for n in names for argv in airflow_runs.get(n, [])],
            "celery_apps": sorted(
                {a[a.index("--app") + 1] for n in names for a in celery_runs.get(n, [])}
            ),
            "sql_urls": [
                v
                for k, v in env.items()
                if k in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND")
                or k == "MOFI_RESULTS_URL"
            ],
        }
        home = str(tmp_path_factory.mktemp("airflow-home"))
        result = _probe(env, deploy_site, home, request)
        for n in names:
            results[n] = result
    return results


def test_airflow_commands_options_and_drivers_are_real(probes):
    assert probes
    errors = sorted({e for r in probes.values() for e in r["errors"]})
    assert not errors, "\n".join(errors)


def test_spark_default_points_at_the_spark_master(services, probes):
    spark = _spark_services(services)
    master = next(n for n, c in spark.items() if c.endswith(".Master"))
    argv = _argv(services[master])
    port = argv[argv.index("--port") + 1] if "--port" in argv else "7077"
    for name, result in probes.items():
        assert result.get("spark_master") == f"spark://{master}:{port}", name
    worker = next(n for n, c in spark.items() if c.endswith(".Worker"))
    assert f"spark://{master}:{port}" in _argv(services[worker])


# --------------------------------------------------------------------------- wiring


def _host_port(url: str) -> tuple[str, int | None]:
    u = urlparse(url.removeprefix("db+"))
    return u.hostname, u.port


def _healthchecked(services, name):
    return bool((services[name].get("healthcheck") or {}).get("test"))


def test_airflow_services_share_secrets_and_reach_each_other(services):
    airflow = _airflow_services(services)
    assert len(airflow) >= 6
    api = [
        n for n, svc in services.items() if _component(_expand(_argv(svc))[-1][1:]) == "api-server"
    ][0]
    api_argv = _expand(_argv(services[api]))[-1]
    api_port = int(api_argv[api_argv.index("--port") + 1]) if "--port" in api_argv else 8080
    for key in (
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    ):
        values = {svc["environment"].get(key) for svc in airflow.values()}
        assert len(values) == 1 and None not in values, f"{key} differs: {values}"
    env = next(iter(airflow.values()))["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert _host_port(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]) == (api, api_port)
    assert urlparse(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).path == "/execution/"
    db_host, _ = _host_port(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    broker_host, _ = _host_port(env["AIRFLOW__CELERY__BROKER_URL"])
    assert services[db_host]["image"].startswith("postgres:")
    assert services[broker_host]["image"].startswith("redis:")
    assert _host_port(env["AIRFLOW__CELERY__RESULT_BACKEND"])[0] == db_host
    results_host, _ = _host_port(env["MOFI_RESULTS_URL"])
    assert results_host == db_host
    dags = env["AIRFLOW__CORE__DAGS_FOLDER"]
    assert dags == f"{IMAGE_ROOT}/dags", dags
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec.get("condition") == "service_healthy":
                assert _healthchecked(services, dep), f"{name} waits for {dep}, which has no check"


def test_pipeline_services_get_the_s3_endpoint(services):
    # every service that runs the project's code: the images built from the repository
    runners = [name for name, _, _ in _built_services(services)]
    assert "spark-worker" in runners and "airflow-worker" in runners
    store = [n for n, s in services.items() if "seaweedfs" in (s.get("image") or "")]
    assert store, "no S3-compatible store service"
    for name in runners:
        env = services[name].get("environment") or {}
        missing = [k for k in S3_ENV if not env.get(k)]
        assert not missing, f"{name} runs pipeline code without {missing}"
        host, port = _host_port(env["AWS_ENDPOINT_URL"])
        assert host == store[0], f"{name}: AWS_ENDPOINT_URL goes to {host}"
        assert f"-s3.port={port}" in services[store[0]]["command"], f"{name}: port {port}"
        assert env["AWS_ACCESS_KEY_ID"] == services[store[0]]["environment"]["AWS_ACCESS_KEY_ID"]


def test_gpu_worker_reserves_nvidia_devices_and_has_cuda_torch(services):
    gpu = [n for n, _, path in _built_services(services) if path.endswith("Dockerfile.gpu")]
    assert gpu, "no service is built from docker/Dockerfile.gpu"
    for name in gpu:
        svc = services[name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
        )
        worker = [
            c for c in _by_program({name: svc}, "airflow")[name] if c[:2] == ["celery", "worker"]
        ]
        queues = worker[0][worker[0].index("--queues") + 1].split(",") if worker else []
        assert {"gpu", "train"} & set(queues), (name, worker)
    served = {
        q
        for name in gpu
        for c in _by_program({name: services[name]}, "airflow")[name]
        if c[:2] == ["celery", "worker"]
        for q in c[c.index("--queues") + 1].split(",")
    }
    assert {"gpu", "train"} <= served, served  # scoring and training both have GPU workers
    trainer = [
        c
        for name in gpu
        for c in _by_program({name: services[name]}, "airflow")[name]
        if c[:2] == ["celery", "worker"] and "train" in c[c.index("--queues") + 1].split(",")
    ]
    # one training node per host: a trainer takes one train task at a time
    assert trainer and all(c[c.index("--concurrency") + 1] == "1" for c in trainer), trainer
    instructions = _dockerfile_instructions(_dockerfile_path(services[gpu[0]]))
    args = dict(r.split("=", 1) for w, r in instructions if w == "ARG" and "=" in r)
    script = " ".join(r for w, r in instructions if w == "RUN")
    torch = re.search(r"pip install torch==(\S+)[^&]*?--index-url\s+(\S+)", script)
    assert torch, "Dockerfile.gpu must install torch from an index URL before make setup"
    assert torch.group(1) == _pin("requirements.txt", "torch")
    index = re.sub(
        r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), torch.group(2).strip("\"'")
    )
    assert re.search(r"/whl/cu\d+$", index), f"{index} is not PyTorch's CUDA index"
    assert script.index("--index-url") < script.index("make setup")
    assert "requirements-deploy.txt" in script.split("make setup", 1)[1]
    assert "torch.version.cuda" in script
