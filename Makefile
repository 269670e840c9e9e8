# Set-up-and-run targets for a fresh machine. Everything goes into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA_ROOT ?= $(firstword $(wildcard ../shared/data) data)
PORT   ?= 8097

.PHONY: setup train test test-fast lint visdom bench accuracy clean

$(VENV)/.installed: requirements.txt requirements-bench.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools<81" wheel
	# visdom 0.2.4 is an sdist whose build needs pkg_resources: build it against setuptools<81
	$(PY) -m pip install -q --no-build-isolation "setuptools<81" visdom==0.2.4 "tornado<6.5"
	$(PY) -m pip install -q -r requirements.txt -r requirements-bench.txt
	touch $@

setup: $(VENV)/.installed

## train: set up, then train the default run (Noisy Adam, FFG posterior, MLP on MNIST)
train: setup
	DATA_ROOT=$(DATA_ROOT) $(PY) train.py --model=FFG --dataset=MNIST --epoch=20

## test: set up, then run the whole test suite (includes the real-browser visdom test)
test: setup
	-bash .ci/install_chromium
	$(PY) -m ruff check .
	DATA_ROOT=$(DATA_ROOT) $(PY) -m pytest -q

## test-fast: set up, then ruff and the tests not marked slow (no end-to-end runs, no browser): about a minute
test-fast: setup
	$(PY) -m ruff check .
	DATA_ROOT=$(DATA_ROOT) $(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .

## visdom: install visdom's web assets from the npm registry if missing, then serve on $(PORT)
visdom: setup
	$(PY) -m tools.visdom_server --port $(PORT)

bench: setup
	DATA_ROOT=$(DATA_ROOT) $(PY) bench/step_time.py
	DATA_ROOT=$(DATA_ROOT) $(PY) bench/per_example.py
	DATA_ROOT=$(DATA_ROOT) $(PY) bench/data_loading.py

accuracy: setup
	DATA_ROOT=$(DATA_ROOT) $(PY) bench/accuracy.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
