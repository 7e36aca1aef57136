# One command per task. Each sets itself up first (a virtualenv in .venv with the CPU build of PyTorch).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
FEAST_VENV ?= .venv-feast
FEAST_STAMP := $(FEAST_VENV)/.installed-stamp
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed-stamp

# Packages install with uv (the pipeline's venv: ~35 s, pip took 60-75 s), bootstrapped by each venv's pip.
# --compile-bytecode: as pip does, so that a process importing torch and Ray need not compile them from
# source (every time, where PYTHONDONTWRITEBYTECODE is set). uv does not read pip's configuration: pip's
# find-links (a local wheel directory, e.g. the CPU build of torch) is handed on.
ifdef PIP_FIND_LINKS
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
endif
UV_INSTALL = $(1)/bin/pip install -q uv && $(1)/bin/uv pip install -q --compile-bytecode --python $(1)/bin/python

# The project's own modules keep their compiled bytecode (__pycache__, git-ignored) where the environment says
# not to write it: every job, Ray worker and test process would compile them again (about 0.5 s of CPU for one
# that imports the jobs), and pytest would rewrite every test file's asserts again (3 s per run).
export PYTHONDONTWRITEBYTECODE :=

# Local Ray binds 127.0.0.1 rather than the machine's interface address.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

MLFLOW_DB ?= sqlite:///mlflow.db

.PHONY: setup feast-env mlflow-env browser run mlflow-ui test test-unit bench bench-gpu scale eval eval-novelty eval-codes clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(call UV_INSTALL,$(VENV)) -c constraints.txt -e '.[test,eval,tracking]'
	touch $@

## make feast-env: the Feast SDK in its own venv (Feast pins pandas<3; the pipeline's venv has pandas 3)
feast-env: $(FEAST_STAMP)

$(FEAST_STAMP): infra/feast/requirements.txt
	python3 -m venv $(FEAST_VENV)
	$(call UV_INSTALL,$(FEAST_VENV)) -r infra/feast/requirements.txt
	touch $@

## make mlflow-env: the MLflow server and UI in their own venv (full MLflow pins pyarrow<26; the pipeline's venv
## has pyarrow 26 and MLflow's client, mlflow-skinny)
mlflow-env: $(MLFLOW_STAMP)

$(MLFLOW_STAMP): infra/mlflow/requirements.txt
	python3 -m venv $(MLFLOW_VENV)
	$(call UV_INSTALL,$(MLFLOW_VENV)) -r infra/mlflow/requirements.txt
	touch $@

## make browser: headless Chromium for the report-rendering test (Debian's package; needs root or sudo)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

## make run: sample data -> train -> score -> summary, on a local Ray with local storage
run: setup
	$(PY) -m jobs.make_sample_data --out data/sample --rows 20000 --shards 4
	$(PY) -m jobs.run --config jobs/configs/demo.yaml --overwrite \
	  --set tracking.uri=$(MLFLOW_DB) --set tracking.registered_model=demo

## make mlflow-ui: MLflow's UI on http://127.0.0.1:5000 over the runs and models `make run` tracked (without
## MLflow 3's server job runner: a pool of polling processes that nothing here uses)
mlflow-ui: mlflow-env
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(MLFLOW_VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_DB) --host 127.0.0.1 --port 5000

## make test: every test (unit and integration on a local Ray and a loopback S3 server), in TEST_PROCS pytest
## processes (one per core; each has its own session Ray and S3 server, and runs whole test files)
TEST_PROCS ?= 2
## (the three virtualenvs and Chromium install side by side: on a fresh machine that is a minute less)
test:
	@$(MAKE) --no-print-directory -j4 setup feast-env mlflow-env browser
	$(PY) -m pytest -n $(TEST_PROCS) --dist loadfile $(PYTEST_ARGS)

## make test-unit: the fast tier (no Ray, no S3 server, no browser; about a minute on 2 cores); a test in it that
## starts any of them fails
test-unit: setup
	$(PY) -m pytest --unit $(PYTEST_ARGS)

## make bench: pipeline vs plain PyTorch / pyarrow; writes bench-results.json and bench-results.md
bench: setup
	$(PY) -m benchmarks

## make bench-gpu: the train step and predictor on a CUDA device vs a plain bf16 loop (no Ray; ~1 minute)
bench-gpu: setup
	$(PY) -m benchmarks.gpu

## make scale: 200,000 vs 10,000,000 rows x 64 features, object store capped at 1 GB (~2.5 GB data on local disk)
scale: setup
	$(PY) -m benchmarks.scale

## make eval: anomaly ranking of the defaults vs IsolationForest and PCA on the 31 tables of benchmarks/adbench/;
## writes eval-results.json and eval-results.md (EVAL_ARGS: e.g. --suite small (all but the five large tables),
## --suite large, --suite dev8 (the first eight), --tables 6_cardio,40_vowels), then the novelty tasks
## (make eval-novelty) and the latent codes (make eval-codes)
EVAL_ARGS ?=
eval: setup
	$(PY) -m jobs.evaluate --num-cpus 4 $(EVAL_ARGS)
	$(PY) -m jobs.evaluate --suite novelty --num-cpus 4 --out novelty-results.json
	$(PY) -m jobs.evaluate --suite codes --num-cpus 4 $(CODES_ARGS)

## make eval-novelty: the same comparison on 18 one-class tasks (scikit-learn's bundled digits, wine and iris, some
## classes normal, trained on those only); writes novelty-results.json and novelty-results.md
eval-novelty: setup
	$(PY) -m jobs.evaluate --suite novelty --num-cpus 4 --out novelty-results.json

## make eval-codes: the latent codes vs PCA and the raw input on six labelled tables, and a downstream model's
## accuracy across retrains with and without code alignment; writes codes-results.json and codes-results.md
## (CODES_ARGS: e.g. --tables wine,penguins)
CODES_ARGS ?=
eval-codes: setup
	$(PY) -m jobs.evaluate --suite codes --num-cpus 4 $(CODES_ARGS)

clean:
	rm -rf data artifacts output bench-results.json bench-results.md bench-work scale-work eval-results.json eval-results.md novelty-results.json novelty-results.md codes-results.json codes-results.md .pytest_cache mlflow.db mlruns
