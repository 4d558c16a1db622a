# Thaw: `make demo` runs the embedded default job, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-local test test-unit lint bench constraints clean k8s-binaries cluster-up cluster-down

install: $(STAMP)

# Idempotent: re-runs only when the dependency files change.
$(STAMP): pyproject.toml constraints.txt hack/install-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[trainer,operator,dev]'
	./hack/install-deps.sh
	touch $@

# The quickstart under torchrun: 2 processes, gloo, on this machine's CPUs.
demo: install
	rm -rf runs/quickstart
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m trainer run examples/quickstart.yaml

demo-local: demo

# The Kubernetes binaries are built first (cached; cold ~15 min) so CI shows the build's progress.
test: install k8s-binaries
	$(PY) -m pytest -q tests

test-unit: install
	$(PY) -m pytest -q tests/unit

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check trainer tests benchmarks

bench: install
	$(PY) benchmarks/bench_trainer.py --repeats 3 --out docs/benchmarks.md
	$(PY) benchmarks/bench_checkpoint.py --repeats 5 --out docs/benchmarks.md

constraints: install
	$(PY) -m pip freeze --exclude-editable | grep -v '^thaw' > constraints.txt.new && \
	  { echo "# Pinned versions for a reproducible install (pip install -c constraints.txt)."; \
	    echo "# Regenerate: make constraints"; cat constraints.txt.new; } > constraints.txt && rm constraints.txt.new

# Kubernetes binaries from Go modules, cached by version in ~/.cache/thaw/bin (cold ~20 min).
k8s-binaries:
	./hack/build-k8s.sh

# A real control plane + kwok GPU nodes + a process node, left running (needs root).
cluster-up: install k8s-binaries
	$(PY) -m tests.cluster up

cluster-down: install
	$(PY) -m tests.cluster down

clean:
	rm -rf runs .pytest_cache
