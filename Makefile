VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test fuzz docs bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

install: $(PY)
	$(PIP) install --quiet -e .

demo: $(PY)
	$(PIP) install --quiet -e ".[demo]"
	$(PY) examples/digits_cnn.py

test: $(PY)
	$(PIP) install --quiet -e ".[test,integration]"
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

fuzz: $(PY)
	$(PIP) install --quiet -e ".[test]"
	JACEXT_FUZZ=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests/fuzz

docs: $(PY)
	$(PIP) install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(PY)
	$(PIP) install --quiet -e ".[bench]"
	$(PY) -m benchmarks

.PHONY: bench-scaling gpu-check
bench-scaling: $(PY)
	$(PIP) install --quiet -e ".[bench]"
	$(PY) -m benchmarks.scaling --threads 1

# issue 17: on a machine with CUDA, the CUDA tests and the GPU benchmark, results under gpu-results/
gpu-check: $(PY)
	$(PIP) install --quiet -e ".[test,bench,integration]"
	$(PY) -m benchmarks.gpu_check --out gpu-results

clean:
	rm -rf $(VENV) *.egg-info

.PHONY: test-matrix lint
test-matrix:
	bash tools/test-matrix.sh

lint: $(PY)
	$(PIP) install --quiet -e ".[lint]"
	$(VENV)/bin/ruff check jacext tests examples benchmarks
	$(VENV)/bin/mypy jacext benchmarks  # tests and examples: ruff only (untyped scripts)
