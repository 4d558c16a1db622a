# Thaw: `make demo` runs the embedded default job, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-local test test-unit lint bench chaos load constraints clean k8s-binaries cluster-up cluster-down \
	crd manifests helm-lint images kind-up kind-demo kind-down demo-down docker-up docker-down peers-env

install: $(STAMP)

# Idempotent: re-runs only when the dependency files change.
$(STAMP): pyproject.toml constraints.txt hack/install-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[trainer,operator,dev]'
	./hack/install-deps.sh
	touch $@

# The quickstart under torchrun: 2 processes, gloo, on this machine's CPUs.
# The quickstart through the real Kubernetes path: local cluster, SeaweedFS, Prometheus, the
# chart, the operator; stage pods train in DDP on the process node. Left running (demo-down).
demo: install k8s-binaries
	$(PY) -m testbed.demo up

demo-down:
	$(PY) -m testbed.demo down

# The same training without a cluster: torchrun on this machine.
demo-local: install
	rm -rf runs/quickstart
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m trainer run examples/quickstart.yaml

# The Kubernetes binaries are built first (cached; cold ~15 min) so CI shows the build's progress.
# The kind tests (tests/kind) build the images and a node image and start a Docker engine
# themselves (docs/testing.md); hack/test.sh starts that setup in the background while the other
# tests run; --durations shows where the time goes.
test: install k8s-binaries
	PY=$(PY) ./hack/test.sh

test-unit: install
	$(PY) -m pytest -q tests/unit

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check thaw_contract trainer operator testbed tests benchmarks hack
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/bench_trainer.py --repeats 3 --out docs/benchmarks.md
	$(PY) benchmarks/bench_checkpoint.py --repeats 5 --out docs/benchmarks.md
	$(PY) benchmarks/bench_data.py --sizes 1000,10000,100000 --out docs/benchmarks.md
	$(PY) benchmarks/bench_shards.py --sizes 1000,10000,100000 --out docs/benchmarks.md
	$(PY) benchmarks/bench_decode.py --images 200 --per-class 40 --out docs/benchmarks.md

# fastai and Lightning for benchmarks/peers.py, in their own venv: never product dependencies. It sees
# the project's venv through a .pth file, so every method trains on the same torch build.
PEERS := .venv-peers
peers-env: install
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PY) -c 'import site; print(site.getsitepackages()[0])' \
	  > "$$($(PEERS)/bin/python -c 'import site; print(site.getsitepackages()[0])')/thaw-venv.pth"
	$(PEERS)/bin/pip install -q --disable-pip-version-check -c constraints.txt -r benchmarks/peers/requirements.txt

# Faults at random moments against real training through the operator (needs root; ~80 min):
# every trial of docs/reliability.md's chaos table, written there. The reduced set runs in `make test`.
chaos: install k8s-binaries
	$(PY) -m tests.chaos --out docs/reliability.md

# The operator at scale on kwok nodes (needs root; over an hour on 2 cores), written to docs/benchmarks.md
# after each run.
load: install k8s-binaries
	$(PY) benchmarks/bench_operator.py --runs 100x3,1000x3,100x20 --nodes 2000 --out docs/benchmarks.md

constraints: install
	$(PY) -m pip freeze --exclude-editable | grep -v '^thaw' > constraints.txt.new && \
	  { echo "# Pinned versions for a reproducible install (pip install -c constraints.txt)."; \
	    echo "# Regenerate: make constraints"; cat constraints.txt.new; } > constraints.txt && rm constraints.txt.new

# Kubernetes binaries from Go modules, cached by version in ~/.cache/thaw/bin (cold ~20 min).
k8s-binaries:
	./hack/build-k8s.sh

# A real control plane + kwok GPU nodes + a process node, left running (needs root).
cluster-up: install k8s-binaries
	$(PY) -m testbed up

cluster-down: install
	$(PY) -m testbed down

clean:
	rm -rf runs .pytest_cache

# --- Install artefacts -------------------------------------------------------------------
HELM = $(shell ls ~/.cache/thaw/bin/current/helm 2>/dev/null || echo helm)

# The CRD is generated from thaw_contract/spec.py; the chart and manifests/ carry copies.
crd: install
	$(PY) -m thaw_operator.crd > manifests/crd/finetunejobs.thaw.dev.yaml
	cp manifests/crd/finetunejobs.thaw.dev.yaml charts/thaw/crds/

# Plain YAML of the default install (kustomize-friendly), rendered from the chart.
manifests: crd k8s-binaries
	$(HELM) template thaw charts/thaw --namespace thaw-system --kube-version 1.34.0 \
	  | $(PY) hack/header.py "make manifests (helm template of charts/thaw)" > manifests/install/thaw.yaml

helm-lint: k8s-binaries
	$(HELM) lint --strict charts/thaw

# A Docker engine: the running one, or a private dockerd (Debian docker.io, own data root and
# socket, a runc wrapper for --privileged on VMs without CAP_SYS_RESOURCE). `eval $$(hack/docker.sh env)`.
docker-up:
	./hack/docker.sh up

docker-down:
	./hack/docker.sh down

# Thaw's two images (Dockerfile targets operator, trainer) as $REGISTRY/thaw-<target>:$TAG
# (default thaw.local/...:dev; `make images REGISTRY=ghcr.io/you TAG=0.1.0`). The
# base is python:3.11 slim where a registry answers, else a Debian base built from the apt mirror.
images: docker-up
	eval "$$(./hack/docker.sh env)" && ./hack/images.sh

# A kind cluster (1 control plane, 2 workers) with the images loaded, SeaweedFS, the Helm chart
# and Prometheus. Node image: kind's published one where a registry answers, else one assembled
# offline (hack/kind-node.sh). `make kind-demo` then runs the quickstart on it.
kind-up: install
	./hack/kind.sh up

kind-demo: install
	$(PY) -m testbed.kind_demo

kind-down:
	./hack/kind.sh down
