# Two commands on a fresh machine: `make run` (serve the default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' model/version.py)

help: ## list the targets with what each does
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: help setup run test lint format default-model css image image-gpu clean

$(STAMP): requirements-serve.txt requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the pinned requirements (dev included)

models/default.pth: | $(STAMP)
	$(PY) -m model.default --out $@

# the ONNX export the service's default backend runs (made here so that the service does not make it at start)
models/default.onnx: models/default.pth
	$(PY) -m model.export --bundle $< --format onnx

default-model: models/default.pth models/default.onnx ## build the offline default model and its ONNX export

# HOST and PORT (make run PORT=9000, HOST=0.0.0.0 for other machines) reach gunicorn.conf.py as IMGCLF_HOST
# and PORT; a --bind in GUNICORN_CMD_ARGS still wins
run: setup models/default.pth models/default.onnx ## serve every bundle in models/ on http://127.0.0.1:8000 (make run PORT=9000 HOST=...)
	IMGCLF_HOST=$(HOST) PORT=$(PORT) $(VENV)/bin/gunicorn --config gunicorn.conf.py "app:create_app()"

# static/app.css is committed (the Docker image needs no build step); tests/test_page.py fails when it is
# out of date with templates/ and static/app.js. Recompile after changing them:
css: setup ## recompile static/app.css after changing templates/ or static/app.js
	$(VENV)/bin/tailwindcss --input assets/app.css --output static/app.css --minify

lint: setup ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## ruff format and ruff check --fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint ## lint, then the whole test suite
	$(PY) -m pytest

# the container image, labelled with the version (model/version.py) and the git revision
image: ## docker build -t imgclf:VERSION (CPU torch), labelled with version and revision
	docker build --build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
		-t imgclf:$(VERSION) -t imgclf .

# the same for NVIDIA GPUs: CUDA torch and onnxruntime-gpu (about 6 GB; docs/deployment.md says what the host needs)
image-gpu: ## docker build -t imgclf:VERSION-gpu (CUDA torch, onnxruntime-gpu), labelled like image
	docker build --build-arg GPU=1 --build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) -t imgclf:$(VERSION)-gpu -t imgclf:gpu .

gpu-check: setup ## on a CUDA machine: CUDA tests, model and service on the GPU beside the CPU backend, AMP training (one JSON)
	$(PY) -m bench.gpu_check

clean: ## remove .venv and the tool caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
