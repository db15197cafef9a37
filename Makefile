# Every target creates the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/sttpfast info --arch sngan_d32 --param sttp-c --rank 64
	$(PY) apps/demo.py

bench: $(STAMP)
	$(PY) -m pip install -q torch-householder || echo "torch-householder not installable: its column is skipped"
	$(PY) bench/householder.py
	$(PY) bench/step.py

clean:
	rm -rf $(VENV) build *.egg-info
