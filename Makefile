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
	$(PIP) install --quiet -e ".[test]"
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

fuzz: $(PY)
	$(PIP) install --quiet -e ".[test]"
	JACEXT_FUZZ=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests/fuzz

docs: $(PY)
	$(PIP) install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(PY)
	$(PIP) install --quiet -e ".[bench]"
	$(PY) -m jacext.bench

.PHONY: bench-scaling
bench-scaling: $(PY)
	$(PIP) install --quiet -e ".[bench]"
	$(PY) -m jacext.bench.scaling --threads 1

clean:
	rm -rf $(VENV) *.egg-info
