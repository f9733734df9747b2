# CPU image: data preparation, CPU training, filtering, evaluation, promotion, the MLflow tracking
# server and `feedback-synth submit`. Build from the repository root:
#   docker build -f images/cpu.Dockerfile -t "$(python images/sync_images.py --print cpu)" .
# Dependencies come from images/requirements-cpu.lock (images/update_locks.py: pip-compile); the
# package is installed last, so a source change rebuilds only the final layers.
# ---- build: a venv with the locked dependencies, then the package ------------------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY images/requirements-cpu.lock /tmp/requirements.lock
# torch/torchvision `+cpu` builds exist only on the PyTorch CPU index; every pin is exact and
# --no-deps installs exactly the lock, `pip check` then proves it is complete. This lock has no
# hashes yet (see its header), so no --require-hashes here; pip checks hashes by itself once a
# regenerated lock carries them (add --require-hashes then, as in gpu.Dockerfile).
RUN pip install --no-cache-dir --no-deps \
        --index-url https://pypi.org/simple \
        --extra-index-url https://download.pytorch.org/whl/cpu \
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
LABEL org.opencontainers.image.title="feedback-synth-cpu" \
      org.opencontainers.image.source="https://github.com/feedback-synth/feedback-synth" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
# Caches go to /tmp so that pods can run with readOnlyRootFilesystem and an emptyDir on /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/app \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /home/app
USER 10001:10001
# Kubernetes probes the MLflow server over HTTP; batch containers have nothing to check.
HEALTHCHECK NONE
CMD ["feedback-synth", "--help"]
