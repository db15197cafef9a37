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

# Two passes (tests/conftest.py says why): the tests that launch processes one at a time,
# the others on two xdist workers (both passes run when the first ends with test results, 0 or
# 1; an interrupted or broken first pass stops there; make fails if either fails)
test: $(STAMP)
	$(PY) -m pytest -q -m processes tests; status=$$?; [ $$status -le 1 ] || exit $$status; \
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not processes" tests && exit $$status

# The paper's compression of the SNGAN discriminator, then a real STTP-R training run on
# scikit-learn's digits (zero setup, under a minute on a laptop CPU).
demo: $(STAMP)
	$(VENV)/bin/sttpfast info --arch sngan_d32 --param sttp-c --rank 64 | tail -n 3
	$(VENV)/bin/sttpfast train --cfg configs/demo.yml --set log.progress=false

# Timing tables (see BENCHMARKS in README.md); quality.py needs Fashion-MNIST
# (apt-get install dataset-fashion-mnist); here at README's CPU budget (about half an hour
# on 2 cores); its default, converged budget (60k images, 15 epochs, 8 methods, 2 seeds)
# takes hours: run `bench/quality.py --plot quality.png` on a GPU.
bench: $(STAMP)
	$(PY) -m pip install -q torch-householder || echo "torch-householder not installable: its column is left out"
	$(PY) bench/householder.py
	$(PY) bench/householder.py --tables frames --batch 16
	$(PY) bench/step.py
	$(PY) bench/data_speed.py
	$(PY) bench/quality.py --subset 30000 --epochs 3 --seeds 0 --params sttp-r svdp-r lowrank

clean:
	rm -rf $(VENV) build *.egg-info
