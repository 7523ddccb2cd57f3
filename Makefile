# The two commands of the README. Each creates .venv if missing, installs the project into it, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo install benchmark clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.py
	$(PY) -m pip install --quiet -e ".[test,baselines,demo,dask]"
	touch $(STAMP)

install: $(STAMP)

# All tests, slow ones included (CI runs this).
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -ra tests

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -ra -m "not slow" tests

demo: $(STAMP)
	$(PY) -m ldct_tf.demo

benchmark: $(STAMP)
	$(PY) -m benchmarks.pipeline

clean:
	rm -rf $(VENV) demo_output .pytest_cache
