# syntax=docker/dockerfile:1
# Two images from one file (`make images`):
#   --target trainer   stage pods: CUDA-enabled torch from PyPI (it ships its CUDA libraries)
#   --target operator  the controller: kopf + kubernetes client, no torch
# Both run as the non-root user 10001 (the stage pods' securityContext asks for it) and work
# with a read-only root filesystem (writes go to /tmp and mounted caches).
# Not buildable on the development machines (no Docker engine); hadolint checks it in `make test`.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin thaw
WORKDIR /app
# Dependencies resolve against the same pins as development and CI.
COPY pyproject.toml constraints.txt README.md ./

FROM base AS trainer
COPY trainer/ trainer/
COPY operator/thaw_operator/ operator/thaw_operator/
RUN pip install --no-compile -c constraints.txt '.[trainer]'
USER 10001
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["--help"]

FROM base AS operator
COPY trainer/ trainer/
COPY operator/thaw_operator/ operator/thaw_operator/
RUN pip install --no-compile -c constraints.txt '.[operator]'
USER 10001
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "thaw_operator"]
