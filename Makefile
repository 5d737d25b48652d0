# make test: all tests.  make run: the main job on the embedded default model.
# Both create .venv from requirements.txt when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on machines without a GPU; override on a GPU box, e.g. TORCH_SPEC="torch>=2.6".
TORCH_SPEC ?= torch==2.13.0

.PHONY: test run bench clean-venv

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

run: $(VENV)/.installed
	$(PY) scripts/demo_patcher.py

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_routing.py

clean-venv:
	rm -rf $(VENV)
