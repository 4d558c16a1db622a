# syntax=docker/dockerfile:1
# Two images from one file (`make images`, hack/images.sh):
#   --target trainer   stage pods: torch from PyPI (the Linux wheels carry their CUDA libraries)
#   --target operator  the controller: kopf + kubernetes client, no torch
# Both run as the non-root user 10001 (the pods' securityContext asks for it) and work with a
# read-only root filesystem (writes go to /tmp and mounted caches).
# PYTHON_IMAGE: python:3.11 slim where a registry is reachable; hack/images.sh builds an
# equivalent Debian bookworm base from the apt mirror where none is (it works either way:
# a venv, so Debian's PEP 668 guard on the system Python does not apply).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app
RUN python3 -m venv /opt/venv \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin thaw
WORKDIR /app
# Dependencies first, resolved against the pins of development and CI; code comes last, so a
# code change rebuilds one small layer. The code is not pip-installed: each image copies only
# its own packages into /app (on PYTHONPATH), which `pip install .` of the whole project can't.
COPY pyproject.toml constraints.txt hack/requirements.py ./
# (The operator stage comes first: the classic builder builds every stage before its target.)

FROM base AS operator
RUN python requirements.py operator > /tmp/requirements.txt \
    && pip install --no-compile -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# The contract and the operator only: no trainer code (import-linter keeps the operator off it).
COPY thaw_contract/ thaw_contract/
COPY operator/thaw_operator/ thaw_operator/
USER 10001
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "thaw_operator"]

FROM base AS trainer
# The demo's data set (spec.data.source: fashion-mnist, 30 MB) from Debian, so a cluster with no
# route to the internet trains on it; other data comes from S3.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/*
# triton (0.9 GB) serves torch.compile only, which Thaw does not use: removed, and the import
# checked, in the same layer.
RUN python requirements.py trainer > /tmp/requirements.txt \
    && pip install --no-compile -c constraints.txt -r /tmp/requirements.txt \
    && pip uninstall -y triton \
    && python -c "import torch, torchvision" \
    && rm /tmp/requirements.txt
# The contract and the trainer only.
COPY thaw_contract/ thaw_contract/
COPY trainer/ trainer/
USER 10001
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["--help"]
