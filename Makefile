# One-command entry points. `make demo` and `make test` each run `setup` first.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
PIP := $(PY) -m pip --disable-pip-version-check -q
# The demo writes under RUN; change it to keep several runs side by side.
RUN ?= runs/demo
PAIRS ?= 5000
SEED ?= 0
RESULTS ?= sqlite:///$(abspath $(RUN))/results.sqlite
# `make demo KEEP=1` leaves the local Airflow running for its UI; AIRFLOW_PORT picks its port
KEEP ?=
AIRFLOW_PORT ?=
AIRFLOW_ARGS := $(if $(AIRFLOW_PORT),--port $(AIRFLOW_PORT))
# Debian packages the tests drive: Chromium (the dashboard's browser test), docker-compose
# (validates docker/compose.yaml; no Docker engine needed), and the servers `make cluster`
# runs on its hosts: PostgreSQL and Redis (SeaweedFS comes from PyPI, Spark with pyspark)
SYSTEM_PACKAGES := chromium docker-compose postgresql redis-server

.PHONY: setup system verify demo demo-cli airflow-up airflow-down cluster test test-fast chaos bench bench-scale bench-map bench-hygiene lint format clean distclean lock

setup: system $(STAMP)

system:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	test -x /usr/lib/postgresql/15/bin/postgres || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  echo "== installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): requirements.txt requirements-lock.txt pyproject.toml docker/requirements-deploy.txt
	@echo "== creating $(VENV) and installing the pinned stack (first time: several minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	@# the deployment's Celery executor and Postgres drivers (make cluster runs them)
	$(PIP) install -r docker/requirements-deploy.txt
	@# the Spark provider's pyspark-client overwrites pyspark's files: restore pyspark 4.3.0
	$(PIP) install --no-deps --force-reinstall pyspark==4.3.0
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -m pipeline_tasks.verify
	touch $(STAMP)

verify: setup
	$(PY) -m pipeline_tasks.verify

# The main job through Airflow: inputs, local Airflow up, build triggered over REST, training
# triggered by the mofi_i2e asset, mAP printed, Airflow stopped (KEEP=1: left running).
demo: setup
	$(VENV)/bin/mofi demo --run $(RUN) --pairs $(PAIRS) --seed $(SEED) $(AIRFLOW_ARGS) $(if $(KEEP),--keep)

# The same stages without Airflow (the CLI engine), e.g. to compare times.
demo-cli: setup
	$(VENV)/bin/mofi kb --out $(RUN)/kb
	$(VENV)/bin/mofi corpus --out $(RUN)/raw --kb $(RUN)/kb --pairs $(PAIRS) --seed $(SEED) --config demo
	$(VENV)/bin/mofi build-i2e --raw $(RUN)/raw --kb $(RUN)/kb --run $(RUN)/i2e_run --out $(RUN)/i2e --config demo
	$(VENV)/bin/mofi status $(RUN)
	$(VENV)/bin/mofi train --i2e $(RUN)/i2e --out $(RUN)/train --config demo
	$(VENV)/bin/mofi eval --model packaged --images $(RUN)/eval --out $(RUN)/eval_packaged.metrics.json --run-id demo/packaged --results $(RESULTS)
	$(VENV)/bin/mofi eval --model $(RUN)/train/model.pt --images $(RUN)/eval --run-id demo/mofi --results $(RESULTS)
	$(VENV)/bin/mofi results --db $(RESULTS) --png $(RUN)/results.png

airflow-up: setup
	$(VENV)/bin/mofi airflow up --run $(RUN) $(AIRFLOW_ARGS)

airflow-down:
	$(VENV)/bin/mofi airflow down --run $(RUN)

# The deployment's shape on this machine (needs root): head and two worker hosts in network
# namespaces, the services of docker/compose.yaml, the pipeline across them with three faults;
# writes runs/cluster/report.json. KEEP=1 leaves it up (it prints every address and login).
cluster: setup
	$(VENV)/bin/mofi -q cluster --out runs/cluster $(if $(KEEP),--keep)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The full chaos suite (kills mid-shard in every stage over several seeds, concurrent runs,
# S3 faults with lost answers); `make test` runs its quick subset (score and write, seed 0).
chaos: setup
	MOFI_CHAOS=full $(PY) -m pytest -q -m chaos

bench: setup
	$(PY) tests/benchmarks/bench_corpus_memory.py --pairs 100000
	$(PY) tests/benchmarks/bench_map.py

# Cost at scale (README "Scale"): stage growth curves, 10k/200k/2M-entity KBs, the
# bookkeeping of 110,000 shards x 5 stages, and the plan at 1.1B pairs (which reads
# runs/bench-map when bench-map ran first); under 30 minutes here. Writes runs/bench-scale.
bench-scale: setup
	$(PY) tests/benchmarks/bench_scale.py --out runs/bench-scale

# Airflow's cost per mapped scoring task at 64, 256 and 1,024 mapped tasks (local Airflow,
# LocalExecutor). Writes runs/bench-map/result.json.
bench-map: setup
	mkdir -p runs/bench-map
	$(PY) tests/benchmarks/bench_map_size.py --work runs/bench-map/work --out runs/bench-map/result.json

# The hygiene stage on planted copies of real photographs (README "Hygiene"): recall per
# kind, false removal, the threshold table, its cost against scoring. Writes runs/bench-hygiene.
bench-hygiene: setup
	$(PY) tests/benchmarks/bench_hygiene.py --out runs/bench-hygiene --demo-pairs 4000,16000

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

lock: setup
	{ echo "# Full pin set of the environment \`make setup\` builds (generated by \`make lock\`)."; \
	  echo "# Used as a constraints file by requirements.txt, so transitive versions are exact too."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu/torch==2.13.0/'; } > requirements-lock.txt

clean:
	rm -rf runs .pytest_cache .ruff_cache spark-warehouse metastore_db derby.log
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data *.egg-info
