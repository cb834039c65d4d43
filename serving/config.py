"""Service settings: the defaults, and the checks that make a bad setting fail at start, not per request.

Every setting can come from the environment with Flask's prefix (``FLASK_MODEL_DIR=/models``,
``FLASK_BATCH_MAX_SIZE=4``...); values are parsed as JSON when they can be, so numbers arrive as numbers,
except the secrets in RAW_STRING_SETTINGS, which are taken exactly as written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from flask import Config

from model.images import DEFAULT_MAX_PIXELS
from model.predictor import DEVICES, PRECISIONS, available_cpus
from serving.backend_choice import BACKENDS

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    # folder whose *.pth bundles are served, each under its file stem
    "MODEL_DIR": "models",
    # the model answering requests that name none; "default" is built offline when missing
    "DEFAULT_MODEL": "default",
    # auto | cpu | cuda
    "DEVICE": "auto",
    # auto: on a GPU host, ONNX Runtime's CUDA provider if installed, else torch on cuda; otherwise onnx.
    # onnx: ONNX Runtime runs each bundle's export (<stem>.onnx, made at start when missing or stale), in
    # workers that never import torch; torch: eager PyTorch. Same answers (probabilities within 1e-4),
    # same batching; onnx is the faster backend on CPU (docs/performance.md). serving/backend_choice.py.
    "BACKEND": "auto",
    # folder for the .onnx exports; unset = beside each bundle (set it when the model folder is read-only)
    "ONNX_DIR": None,
    # torch on a GPU: auto = bf16 or fp16 where it agrees with fp32 on check images (top-1, |dp| <= 1e-3), else fp32
    "PRECISION": "auto",
    # intra-op threads per worker for either backend; 0 = the CPUs this process may use
    "TORCH_THREADS": 0,
    # largest request body in bytes, enforced while streaming too (Flask's own setting)
    "MAX_CONTENT_LENGTH": 10 * 1024 * 1024,
    # largest image, in pixels, checked from the header before decoding
    "MAX_IMAGE_PIXELS": DEFAULT_MAX_PIXELS,
    # most pixels of all the images of one request together, counted from their headers before any is
    # decoded (each file's decoding and conversion costs CPU and memory in proportion to its pixels); a file
    # past it gets its own 413 too_many_total_pixels. At least MAX_IMAGE_PIXELS.
    "MAX_REQUEST_PIXELS": 2 * DEFAULT_MAX_PIXELS,
    # most `file` fields in one request
    "MAX_FILES": 16,
    "TOP_K_DEFAULT": 3,
    "TOP_K_MAX": 20,
    # dynamic batching: most images in one forward pass (1 = off: one at a time under a lock; 0 = chosen for
    # the device: 8 on a CPU, 32 on a GPU, serving/registry.py) ...
    "BATCH_MAX_SIZE": 0,
    # ... and the longest the oldest waiting request is held for others to join. 0: a batch is what queued
    # while the previous pass ran (under load batches still form; a lone request never waits)
    "BATCH_MAX_DELAY_MS": 0.0,
    # when set, POST /predict needs `Authorization: Bearer <key>`; at least API_KEY_MIN_LENGTH characters
    "API_KEY": None,
    # most requests of one worker decoding and inferring at once (POST /predict, POST /). 0 = 3 per model
    # thread (INFLIGHT_PER_MODEL_THREAD), at most INFLIGHT_AUTO_MAX and the request threads minus
    # PROBE_THREADS. The request threads left beyond those and PROBE_THREADS form a waiting room: a request
    # finding no free slot waits there up to ADMISSION_WAIT_MS for one; with the room full, or after that
    # wait, it gets 503 busy with Retry-After. The PROBE_THREADS never wait, so /healthz, /readyz and
    # /metrics answer under any load. No limit outside gunicorn.
    "MAX_INFLIGHT": 0,
    "ADMISSION_WAIT_MS": 1000,
    # POST /explain (a Grad-CAM heat map over the photo, from each bundle's torch model, loaded in a worker on
    # its first /explain) and the page's "Why?" button: on | off. Off: /explain answers 404 explanations_off.
    "EXPLAIN": "on",
}

API_KEY_MIN_LENGTH = 16
# JSON-decoding a secret changes it: FLASK_API_KEY=null would become None (no key: an open server) and
# 1.000000000000000000 the key "1.0".
RAW_STRING_SETTINGS = ("API_KEY",)

# request threads kept out of admission for probes and scrapes (Kubernetes' liveness and readiness, Prometheus)
PROBE_THREADS = 2
# the automatic MAX_INFLIGHT at most: more parallel decodes buy nothing on a few cores (one batcher runs the
# model), and each costs up to one worst-case image of memory (deploy/k8s is sized for this many)
INFLIGHT_AUTO_MAX = 6
# requests decoding at once per model thread of a worker: one in the model, two decoding beside it; a
# worker per CPU (gunicorn.conf.py) then admits 3, and a host as many in all as it has cores to run them
INFLIGHT_PER_MODEL_THREAD = 3
# set by gunicorn.conf.py in each worker: the request threads gunicorn gave it (--threads, GUNICORN_THREADS)
REQUEST_THREADS_ENV = "IMGCLF_REQUEST_THREADS"

INT_SETTINGS = {
    "TORCH_THREADS": 0,
    "MAX_CONTENT_LENGTH": 1,
    "MAX_IMAGE_PIXELS": 1,
    "MAX_REQUEST_PIXELS": 1,
    "MAX_FILES": 1,
    "TOP_K_DEFAULT": 1,
    "TOP_K_MAX": 1,
    "BATCH_MAX_SIZE": 0,
    "MAX_INFLIGHT": 0,
    "ADMISSION_WAIT_MS": 0,
}


class ConfigError(ValueError):
    """A setting that makes no sense; raised while the app is created so the worker refuses to start."""


def load_settings(config: Config, test_config: Mapping[str, Any] | None = None) -> Config:
    """The defaults, then the FLASK_* environment, then ``test_config``; checked (ConfigError)."""
    config.from_mapping(DEFAULTS)
    config.from_prefixed_env()
    read_raw_environment(config)
    if test_config is not None:
        config.from_mapping(test_config)
    check_config(config)
    return config


def read_raw_environment(config: MutableMapping[str, Any], environ: Mapping[str, str] = os.environ) -> None:
    """Put the RAW_STRING_SETTINGS back as the environment wrote them, after Flask's ``from_prefixed_env``."""
    for key in RAW_STRING_SETTINGS:
        if "FLASK_" + key in environ:
            config[key] = environ["FLASK_" + key]


def check_config(config: MutableMapping[str, Any]) -> None:
    """Coerce the types the environment may have got wrong and reject impossible values."""
    for key, minimum in INT_SETTINGS.items():
        value = config[key]
        try:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            config[key] = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer, not {value!r}") from None
        if config[key] < minimum:
            raise ConfigError(f"{key} must be at least {minimum}, not {config[key]}")
    try:
        config["BATCH_MAX_DELAY_MS"] = float(config["BATCH_MAX_DELAY_MS"])
    except (TypeError, ValueError):
        raise ConfigError(f"BATCH_MAX_DELAY_MS must be a number, not {config['BATCH_MAX_DELAY_MS']!r}") from None
    if not 0 <= config["BATCH_MAX_DELAY_MS"] <= 10_000:
        raise ConfigError("BATCH_MAX_DELAY_MS must be between 0 and 10000")
    if config["MAX_REQUEST_PIXELS"] < config["MAX_IMAGE_PIXELS"]:
        raise ConfigError(
            f"MAX_REQUEST_PIXELS ({config['MAX_REQUEST_PIXELS']:,}) must be at least MAX_IMAGE_PIXELS "
            f"({config['MAX_IMAGE_PIXELS']:,}): an image the service accepts must fit in a request"
        )
    if config["TOP_K_DEFAULT"] > config["TOP_K_MAX"]:
        raise ConfigError(
            f"TOP_K_DEFAULT ({config['TOP_K_DEFAULT']}) must not exceed TOP_K_MAX ({config['TOP_K_MAX']})"
        )
    if config["DEVICE"] not in DEVICES:
        raise ConfigError(f"DEVICE must be one of {DEVICES}, not {config['DEVICE']!r}")
    if config["PRECISION"] not in PRECISIONS:
        raise ConfigError(f"PRECISION must be one of {PRECISIONS}, not {config['PRECISION']!r}")
    if config["BACKEND"] not in BACKENDS:
        raise ConfigError(f"BACKEND must be one of {BACKENDS}, not {config['BACKEND']!r}")
    config["EXPLAIN"] = on_or_off("EXPLAIN", config["EXPLAIN"])
    config["ONNX_DIR"] = str(config["ONNX_DIR"]) if config.get("ONNX_DIR") not in (None, "") else None
    config["MODEL_DIR"] = str(config["MODEL_DIR"])
    config["DEFAULT_MODEL"] = str(config["DEFAULT_MODEL"])
    config["API_KEY"] = valid_api_key(config.get("API_KEY"))


ON = ("on", "true", "1", "yes")
OFF = ("off", "false", "0", "no")


def on_or_off(key: str, value: Any) -> bool:
    """A switch: on/off (true/false, 1/0, yes/no; the environment's JSON gives booleans and numbers)."""
    text = str(value).strip().lower()
    if text in ON:
        return True
    if text in OFF:
        return False
    raise ConfigError(f"{key} must be on or off, not {value!r}")


def valid_api_key(key: Any) -> str | None:
    """None (not set) turns authentication off; a key that is set must be a real one: fail closed, never
    open. The messages never quote the value: it is a secret."""
    if key is None:
        return None
    if not isinstance(key, str):
        raise ConfigError(f"API_KEY must be a string, not a {type(key).__name__}")
    if key.strip().lower() in ("", "null", "none"):
        raise ConfigError(
            "API_KEY is set but empty (or 'null'): refusing to start without authentication by accident; set a "
            "long random key (openssl rand -hex 32) or unset FLASK_API_KEY to serve without one"
        )
    if len(key) < API_KEY_MIN_LENGTH:
        raise ConfigError(
            f"API_KEY is {len(key)} characters long; at least {API_KEY_MIN_LENGTH} are needed "
            "(openssl rand -hex 32 makes a good one)"
        )
    return key


def request_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """The request threads of this gunicorn worker, or None when not under gunicorn.conf.py."""
    raw = environ.get(REQUEST_THREADS_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def admission_limit(config: Mapping[str, Any], threads: int | None) -> int | None:
    """MAX_INFLIGHT in effect: the setting, or (0) INFLIGHT_PER_MODEL_THREAD per model thread, at most
    INFLIGHT_AUTO_MAX and the request threads minus PROBE_THREADS; None = no limit."""
    wanted = config["MAX_INFLIGHT"]
    if threads is None:
        return wanted or None
    if not wanted:
        model_threads = config["TORCH_THREADS"] or available_cpus()
        return max(1, min(threads - PROBE_THREADS, INFLIGHT_AUTO_MAX, INFLIGHT_PER_MODEL_THREAD * model_threads))
    if wanted > threads - PROBE_THREADS:
        logger.warning(
            "MAX_INFLIGHT=%d of %d request threads leaves fewer than %d for /healthz, /readyz and /metrics: "
            "they may wait behind inference under load",
            wanted,
            threads,
            PROBE_THREADS,
        )
    return wanted


def admission_waiting_room(limit: int | None, threads: int | None) -> int:
    """How many requests may wait for a slot: the request threads beyond the admitted and the probes'."""
    if limit is None or threads is None:
        return 0
    return max(0, threads - PROBE_THREADS - limit)
