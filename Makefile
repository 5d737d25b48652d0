# make test: lint, then all tests.  make lint: ruff alone.  make run: the main job on the embedded default model.
# make eval: routing configurations on lm-evaluation-harness tasks (offline tasks on the embedded model by default).
# All create .venv from requirements-dev.txt (requirements.txt, the runtime, plus notebook execution, tests and
# lint) when it is missing or older than either file; make test and make eval add requirements-eval.txt
# (lm-eval, optional: make run does not need it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch as pip resolves it: on Linux x86_64 PyPI's torch==2.13.0 is the CUDA build (with ~20 nvidia-* packages,
# several GB); for the CPU build give PyTorch's CPU index, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
# On a GPU box any recent torch, e.g. TORCH_SPEC="torch>=2.6".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
# Triton for the kernel tests under its CPU interpreter, installed beside (not into) .venv, so that the
# rest of the suite runs on a plain CPU install as users have it.
TRITON_SPEC ?= triton==3.9.0
TRITON_SITE := $(VENV)/triton-interpreter
EVAL_INSTALLED := $(VENV)/.eval-installed

.PHONY: test lint run eval bench clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(EVAL_INSTALLED): $(VENV)/.installed requirements-eval.txt
	$(PY) -m pip install --quiet -r requirements-eval.txt
	touch $@

$(TRITON_SITE)/.installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(TRITON_SITE) "$(TRITON_SPEC)"
	touch $@

# One ruff configuration (ruff.toml) for the module, the notebook, tests, scripts and benchmarks.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Tests in TEST_WORKERS processes (pytest-xdist), one file to a process so that a file's shared fixtures (the
# notebook's quick run) run once, each process on TEST_THREADS threads: most tests are bound by Python, not by
# torch's kernels, so two processes of one thread beat one of two on 2 cores (README.md: make test's time).
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
test: lint $(VENV)/.installed $(TRITON_SITE)/.installed $(EVAL_INSTALLED)
	OMP_NUM_THREADS=$(TEST_THREADS) BH_TRITON_INTERPRETER_SITE=$(abspath $(TRITON_SITE)) \
		$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The notebook, headless, on the embedded model: results/ and the executed notebook, which only a successful
# default run replaces (scripts/run_notebook.py). Extra papermill arguments go in RUN_ARGS, e.g.
# make run RUN_ARGS="-p max_new_tokens 10" (written to results/runs/<hash>/ unless output_dir is given).
run: $(VENV)/.installed
	$(PY) scripts/run_notebook.py $(RUN_ARGS)

# Downstream accuracy (scripts/run_downstream.py): results/lm_eval/ (CSV, figure, report section, one JSON
# per configuration, resumable). Arguments in EVAL_ARGS, e.g. make eval EVAL_ARGS="--limit 100 --tasks heldout_continuation".
eval: $(EVAL_INSTALLED)
	$(PY) scripts/run_downstream.py $(EVAL_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_routing.py

clean-venv:
	rm -rf $(VENV)
