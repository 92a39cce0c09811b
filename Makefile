# Set-up and the README's commands. Everything installs into ./.venv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
DEMO_EXPERIMENT ?= demo

.PHONY: install install-ray demo test lint bench bench-real ui ui-screenshots server server-stop clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Ray for executor=ray (the tests and the bench need it; `make demo` does not): the `ray`
# extra, plain Ray without its dashboard (about 10 s here).
install-ray: $(VENV)/.installed-ray

$(VENV)/.installed-ray: $(VENV)/.installed
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
	touch $@

RUN := mlflow run . --env-manager local --experiment-name $(DEMO_EXPERIMENT)

# The main job on the bundled demo data (README quickstart, first command): 5-fold training
# (with the near-duplicate check before the folds), promotion of the top-3 fold models as the
# `champion` ensemble, prediction on the held-out test folder, then (predict's `explain`
# option, same process) Grad-CAM of the champion on 8 test images as an explain run.
demo: install
	$(PYTHON) -m training.demo_data --output data/demo
	$(RUN) -e kfold -P config=configs/demo.yaml
	$(RUN) -e promote -P top_k=3
	$(RUN) -e predict -P data=data/demo/test \
		-P output=outputs/demo_test_predictions.csv -P explain=8
	@echo "Predictions: outputs/demo_test_predictions.csv"
	@echo "See it all in the MLflow UI: make ui, then open"
	@echo "  http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	@echo "  (click 'Model training' at the top left once: the browser remembers it)"

# The test suite (README quickstart, second command; CI runs it). Exit 5 = no tests collected.
test: install-ray
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations 15 tests || [ $$? -eq 5 ]

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Speed and memory against bare baselines (a few minutes; rewrites BENCHMARKS.md).
bench: install-ray
	$(PYTHON) -m bench.run_all

# The recipes on real photos (../shared/data/hymenoptera, outside the repo) against a bare
# seed-000 script and a linear probe, 224 px, then a 5-fold job of each recipe: about 23
# minutes on 2 quiet cores; rewrites the real-data section of BENCHMARKS.md.
bench-real: install
	$(PYTHON) -m bench.real_data --kfold

# MLflow's default store (./mlflow.db, artifacts in ./mlruns); the link opens the
# model-training view (a new browser otherwise starts in the GenAI one).
ui: install
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	@echo "(click 'Model training' at the top left once: the browser remembers it)"
	mlflow ui -h 127.0.0.1 -p 5000

# Screenshots of the MLflow UI after `make demo`, taken in headless Chromium (the OS's:
# apt-get install chromium; the `ui` extra is Playwright's Python package, no browser
# download); exits 1 when a page misses what the README says it shows. Writes docs/ui/.
ui-screenshots: $(VENV)/.installed-ui
	$(PYTHON) bench/ui_screenshots.py --output docs/ui

$(VENV)/.installed-ui: $(VENV)/.installed
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[ui]'
	touch $@

# One tracking server for a team (README "Team set-up"): PostgreSQL + `mlflow server` with
# proxied artifacts, state in ./.server; prints the exports (also in .server/env).
# Options: make server SERVER_FLAGS="--port 5050 --pg_port 5433 --workers 2 --threads 4"
server: install
	$(PYTHON) -m server start $(SERVER_FLAGS)

server-stop:
	$(PYTHON) -m server stop $(SERVER_FLAGS)

clean:
	rm -rf data/demo mlflow.db mlruns/*.db mlruns/[0-9]* mlruns/*.yaml outputs
