# Set-up and the README's commands. Everything installs into ./.venv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
DEMO_EXPERIMENT ?= demo

.PHONY: install demo test lint bench bench-real ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

RUN := mlflow run . --env-manager local --experiment-name $(DEMO_EXPERIMENT)

# The main job on the bundled demo data (README quickstart, first command): 5-fold training,
# promotion of the top-3 fold models as the `champion` ensemble, prediction on the held-out
# test folder.
demo: install
	$(PYTHON) -m training.demo_data --output data/demo
	$(RUN) -e kfold -P config=configs/demo.yaml
	$(RUN) -e promote -P top_k=3
	$(RUN) -e predict -P data=data/demo/test \
		-P output=outputs/demo_test_predictions.csv
	@echo "Predictions: outputs/demo_test_predictions.csv"
	@echo "See it all in the MLflow UI: make ui  (then open http://127.0.0.1:5000)"

# The test suite (README quickstart, second command; CI runs it). Exit 5 = no tests collected.
test: install
	$(PYTHON) -m pytest -q tests || [ $$? -eq 5 ]

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Speed and memory against bare baselines (a few minutes; rewrites BENCHMARKS.md).
bench: install
	$(PYTHON) -m bench.run_all

# The recipes on real photos (../shared/data/hymenoptera, outside the repo) against a bare
# seed-000 script and a linear probe, 224 px: about 25 minutes on 2 cores; rewrites the
# real-data section of BENCHMARKS.md.
bench-real: install
	$(PYTHON) -m bench.real_data

ui: install
	mlflow ui -h 127.0.0.1 -p 5000  # MLflow's default store: ./mlflow.db, artifacts in ./mlruns

clean:
	rm -rf data/demo mlflow.db mlruns/*.db mlruns/[0-9]* mlruns/*.yaml outputs
