# syntax=docker/dockerfile:1
# Multi-stage: `docker build --target trainer .` gives the stage-pod image (CUDA-enabled
# torch from PyPI, which ships its CUDA libraries). The slim `operator` target arrives
# with the operator. Not buildable on the development machines (no Docker engine there).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin thaw
WORKDIR /app

FROM base AS trainer
# Dependencies first (cached layer), then the code.
COPY pyproject.toml constraints.txt README.md ./
COPY trainer/ trainer/
COPY operator/thaw_operator/ operator/thaw_operator/
RUN pip install -c constraints.txt '.[trainer]'
USER 10001
ENV HOME=/home/thaw
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["--help"]
