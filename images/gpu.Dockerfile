# GPU image: guided generation and GPU training. Build from the repository root:
#   docker build -f images/gpu.Dockerfile -t "$(python images/sync_images.py --print gpu)" .
# Base: the same python:3.11-slim as the CPU image (the interpreter the lock was made with), not a
# CUDA base image: torch's Linux wheels on PyPI carry the CUDA user-space libraries (the nvidia-*,
# cuda-* and triton pins in images/requirements.lock), so a CUDA base would only add a second,
# unused CUDA runtime. The node supplies the driver (CUDA 13 wheels: driver >= 580); the
# NVIDIA_* variables below are the ones nvidia/cuda images set for the NVIDIA container toolkit,
# and /usr/local/nvidia/lib64 is where GKE mounts the driver libraries.
# ---- build: a venv with the locked dependencies, then the package ------------------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY images/requirements.lock /tmp/requirements.lock
# The lock (images/update_locks.py: pip-compile --generate-hashes) pins every package with its
# hashes: --require-hashes refuses anything unpinned or altered, --no-deps installs exactly the
# lock, and `pip check` then proves it is complete.
RUN pip install --no-cache-dir --no-deps --require-hashes --index-url https://pypi.org/simple \
        -r /tmp/requirements.lock \
    && pip check
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# components/ and pipelines/ go into the wheel too: `feedback-synth compile/submit` run in this image
COPY components ./components
COPY pipelines ./pipelines
COPY images/images.yaml ./images/images.yaml
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check

# ---- runtime ------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="feedback-synth-gpu" \
      org.opencontainers.image.source="https://github.com/feedback-synth/feedback-synth" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/app \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /home/app
USER 10001:10001
# Batch container run by Kubeflow Pipelines: nothing long-running to health-check.
HEALTHCHECK NONE
CMD ["feedback-synth", "--help"]
