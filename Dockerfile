# The image of the Kubernetes work pool (deployments/kubernetes/): Python, this project at
# /opt/nanochat and its .venv on PATH, so a pod's `prefect flow-run execute` and
# `python -m flows.node` run as they are.
#
#   docker build -t nanochat .                                                              CUDA torch
#   docker build -t nanochat --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .  CPU torch
#
# Never built where it was written: that workplace had no docker daemon and reached no base image.
# tests/test_kubernetes.py parses it (dockerfile-parse) and checks what the pods rely on.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
# a failed download fails the build instead of piping nothing into sh
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# maturin builds rustbpe's extension with a C compiler and a Rust toolchain (Debian's current ones)
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH
# Where torch comes from: PyPI's Linux wheels are the CUDA build; another CUDA or the CPU build is
# an index of download.pytorch.org (whl/cu1xx, whl/cpu).
ARG TORCH_INDEX=https://pypi.org/simple
WORKDIR /opt/nanochat
COPY . .
# `make setup`'s commands, but torch from TORCH_INDEX: setup picks the build by the GPU it sees, and
# a build sees none. The Rust build directory is not needed once the extension is in place.
RUN python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir --upgrade pip \
    && .venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX" \
    && .venv/bin/pip install --no-cache-dir -e . \
    && rm -rf rustbpe/target

FROM python:${PYTHON_VERSION}-slim-bookworm
# Pods run as this user (by number, so a pod's runAsNonRoot can check it); its home holds Prefect's
# and nanochat's caches (~/.prefect, ~/.cache).
RUN useradd --create-home --uid 1000 nanochat
COPY --from=build --chown=nanochat:nanochat /opt/nanochat /opt/nanochat
WORKDIR /opt/nanochat
ENV PATH=/opt/nanochat/.venv/bin:$PATH \
    VIRTUAL_ENV=/opt/nanochat/.venv \
    PYTHONUNBUFFERED=1
USER 1000
