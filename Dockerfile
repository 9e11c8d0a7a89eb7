# hemoweb: CPU image by default; `--build-arg VARIANT=cuda` builds on NVIDIA's CUDA runtime.
# Stage 1 builds wheels (mysqlclient needs a compiler); stage 2 runs them without build tools.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.* pkg-config=1.8.* libmariadb-dev=1:10.11.* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY requirements.txt .
ARG VARIANT
# The CPU variant takes PyTorch's CPU wheels; the CUDA variant the default (CUDA) wheels.
RUN if [ "$VARIANT" = "cpu" ]; then export PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cpu"; fi \
    && pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt

FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends libmariadb3=1:10.11.* fonts-dejavu-core=2.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 hemoweb
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/* && rm -rf /wheels
WORKDIR /app
COPY --chown=hemoweb:hemoweb . .
ENV DEBUG=0 \
    PYTHONUNBUFFERED=1 \
    MEDIA_ROOT=/data/media \
    MODELS_DIR=/data/models \
    VAR_DIR=/data/var \
    STATIC_ROOT=/app/staticfiles \
    YOLO_OFFLINE=1 \
    YOLO_AUTOINSTALL=0 \
    HF_HUB_OFFLINE=1
RUN mkdir -p /data && chown hemoweb:hemoweb /data
USER 1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"]
ENTRYPOINT ["./scripts/container-start"]
CMD ["web"]
