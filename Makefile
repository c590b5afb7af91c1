# make test: venv + `pip install -e .[dev]` (again only when pyproject.toml changes), then pytest $(ARGS).
# make train: venv + the library and the train extras, then `python -m train $(ARGS)`.
# make bench: venv + the bench extras and the PyTorch peer, then `python -m benchmarks.$(BENCH)`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

BENCH ?= attention

.PHONY: test test-slow train bench venv clean

# Two workers for two cores; whole files per worker, so each compiles only its own models.
test: $(VENV)/.installed-dev
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow" $(ARGS)

# The few end-to-end runs marked slow (minutes each on 2 cores); CI runs them after `make test`.
test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -n 2 --dist loadfile -m slow $(ARGS)

train: $(VENV)/.installed
	$(PY) -m train $(ARGS)

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.$(BENCH) $(ARGS)

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[train]'
	touch $@

# The dev install brings the runtime deps too, so it satisfies `make train` as well.
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[bench,torch]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
