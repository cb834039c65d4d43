# Two commands on a fresh machine: `make run` (serve the default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run test lint format default-model css clean

$(STAMP): requirements-serve.txt requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

models/default.pth: | $(STAMP)
	$(PY) -m model.default --out $@

# the ONNX export the service's default backend runs (made here so that the service does not make it at start)
models/default.onnx: models/default.pth
	$(PY) -m model.export --bundle $< --format onnx

default-model: models/default.pth models/default.onnx

run: setup models/default.pth models/default.onnx
	$(VENV)/bin/gunicorn --config gunicorn.conf.py "app:create_app()"

# static/app.css is committed (the Docker image needs no build step); tests/test_page.py fails when it is
# out of date with templates/ and static/app.js. Recompile after changing them:
css: setup
	$(VENV)/bin/tailwindcss --input assets/app.css --output static/app.css --minify

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
