# hypyr — `make demo` boots VMs; `make test` runs every test (unit, host-KVM, lab end-to-end).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HYPYR := $(PY) -m hypyr
PYTEST_LAB_OPTS ?= -q -p no:cacheprovider -o console_output_style=classic

.PHONY: all deps demo test test-unit test-lab image bench clean

all: test

$(VENV)/.installed: pyproject.toml scripts/install-deps.sh
	bash scripts/install-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[test]'
	touch $@

deps: $(VENV)/.installed

image: deps
	$(HYPYR) image build

demo: image
	PY=$(PY) bash scripts/demo.sh

test-unit: deps
	$(PY) -m pytest tests/unit tests/kvm -q

# One L1 boot runs every lab test.  (The host-KVM payload tests stay on the host: under QEMU
# TCG's emulated SVM a guest spinning with interrupts off once wedged L1 in soft lockups.)
# The timeout turns a wedged lab into a plain failure instead of a hung CI.
LAB_TIMEOUT ?= 2700
test-lab: image
	$(HYPYR) lab --timeout $(LAB_TIMEOUT) -- $(PY) -m pytest tests/lab $(PYTEST_LAB_OPTS)

test: test-unit test-lab

bench: image
	$(PY) bench/boot.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
