"""The OpenAPI 3.1 description of the API, with this server's limits and model names filled in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model import version as release
from serving.error_catalogue import SERVER_ERRORS

JSON = "application/json"
# the errors only /explain answers
EXPLAIN_ONLY_ERRORS = ("explanations_off", "explanation_unsupported")
# every error /predict may answer: all but a path that does not exist and the explanations' own
PREDICT_ERRORS = [kind.code for kind in SERVER_ERRORS if kind.code not in ("not_found", *EXPLAIN_ONLY_ERRORS)]
# /explain: the same, and its own (too_many_total_pixels needs several files, which it refuses before)
EXPLAIN_ERRORS = [code for code in PREDICT_ERRORS if code != "too_many_total_pixels"] + list(EXPLAIN_ONLY_ERRORS)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _image_body(file_schema: dict[str, Any]) -> dict[str, Any]:
    """The request body /predict and /explain take: multipart ``file`` (as ``file_schema``) with ``model``
    and ``top_k``, or the image itself as the body."""
    binary = {"type": "string", "format": "binary"}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": file_schema, "model": {"type": "string"}, "top_k": {"type": "integer"}},
                }
            },
            "image/*": {"schema": binary},
            "application/octet-stream": {"schema": binary},
        },
    }


def _errors(codes: list[str]) -> dict[str, Any]:
    """One response per status, described (a Markdown list) by the catalogue's entries for ``codes``."""
    lines: dict[str, list[str]] = {}
    for kind in SERVER_ERRORS:
        if kind.code in codes:
            lines.setdefault(str(kind.status), []).append(f"- `{kind.code}`: {kind.when}")
    return {
        status: {"description": "\n".join(found), "content": {JSON: {"schema": _ref("Error")}}}
        for status, found in lines.items()
    }


def build_openapi(config: Mapping[str, Any], model_names: list[str]) -> dict[str, Any]:
    max_mb = config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
    params = [
        {
            "name": "model",
            "in": "query",
            "required": False,
            "description": f"model to use (default: {config['DEFAULT_MODEL']}); also accepted as a form field",
            "schema": {"type": "string", "enum": model_names},
        },
        {
            "name": "top_k",
            "in": "query",
            "required": False,
            "description": "how many classes to return; also accepted as a form field",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": config["TOP_K_MAX"],
                "default": config["TOP_K_DEFAULT"],
            },
        },
    ]
    predict = {
        "summary": "Classify one or more images",
        "description": (
            f"The bytes decide the format (JPEG, PNG, WebP, GIF, BMP, TIFF), not the declared type. Body at most "
            f"{max_mb:g} MB, images at most {config['MAX_IMAGE_PIXELS']:,} pixels, at most {config['MAX_FILES']} "
            "files. Each error's code is listed under its status."
        ),
        "operationId": "predict",
        "parameters": params,
        "requestBody": _image_body(
            {
                "description": "one image, or several `file` fields",
                "oneOf": [
                    {"type": "string", "format": "binary"},
                    {"type": "array", "items": {"type": "string", "format": "binary"}},
                ],
            }
        ),
        "responses": {
            "200": {
                "description": "predictions (one file) or one result per file, in order (several files)",
                "content": {JSON: {"schema": {"oneOf": [_ref("Prediction"), _ref("MultiPrediction")]}}},
            },
            **_errors(PREDICT_ERRORS),
        },
    }
    explain = {
        "summary": "Classify one image and show where the model looked (Grad-CAM)",
        "description": (
            "The same request as /predict for one image (same limits and errors), answered by the model's torch "
            "network whatever backend serves /predict: the top-k classes and a PNG of the model's input (the "
            "eval crop) with a Grad-CAM heat map of the top class over it, base64 in `overlay_png`; with "
            "`Accept: image/png`, the PNG itself. Counts against the same admission limit. Off with "
            "`FLASK_EXPLAIN=off` (404 `explanations_off`); transformers cannot be explained (422)."
        ),
        "operationId": "explain",
        "parameters": params,
        "requestBody": _image_body({"type": "string", "format": "binary", "description": "one image"}),
        "responses": {
            "200": {
                "description": "the predictions and the heat-map overlay (JSON), or the overlay (PNG)",
                "content": {
                    JSON: {"schema": _ref("Explanation")},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_errors(EXPLAIN_ERRORS),
        },
    }
    if config.get("API_KEY"):
        predict["security"] = [{"bearer": []}]
        explain["security"] = [{"bearer": []}]
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "imgclf",
            "version": release.__version__,
            "description": "Image classification: top-k classes of an uploaded photo.",
        },
        "paths": {
            "/predict": {"post": predict},
            "/explain": {"post": explain},
            "/healthz": {"get": _simple("Liveness: the worker answers", "Status")},
            "/version": {"get": _simple("The project's version and the image's source revision", "Version")},
            "/readyz": {
                "get": {
                    **_simple("Readiness: every model loaded and warmed up", "Ready"),
                    "responses": {
                        "200": {"description": "ready", "content": {JSON: {"schema": _ref("Ready")}}},
                        **_errors(["not_ready"]),
                    },
                }
            },
            "/models": {"get": _simple("The models served, with classes, preprocessing and metrics", "Models")},
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics of all workers",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/": {
                "get": _page("The web page: the upload form", "page"),
                "post": _page("The page's form without JavaScript (fields as /predict): the result page", "pageForm"),
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": {
                        "200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}
                    },
                }
            },
        },
        "components": {"schemas": _schemas(), "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    return doc


def _page(summary: str, operation_id: str) -> dict[str, Any]:
    """The web page (serving/pages.py): HTML for people, errors included; not part of the JSON API."""
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "summary": summary,
        "operationId": operation_id,
        "responses": {"200": {"description": "HTML", "content": html}},
    }


def _simple(summary: str, schema: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": schema.lower(),
        "responses": {"200": {"description": "OK", "content": {JSON: {"schema": _ref(schema)}}}},
    }


def _schemas() -> dict[str, Any]:
    error_body = {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {
                "type": "string",
                "description": "stable, one of the examples; a rarer refusal of gunicorn's (417, 501) is named "
                "after its reason phrase",
                "examples": [kind.code for kind in SERVER_ERRORS],
            },
            "message": {"type": "string"},
            "request_id": {"type": "string", "description": "only on 500"},
        },
    }
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": error_body}},
        "Class": {
            "type": "object",
            "required": ["label", "index", "score"],
            "properties": {
                "label": {"type": "string"},
                "index": {"type": "integer"},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
            },
        },
        "Prediction": {
            "type": "object",
            "required": ["model", "predictions", "time_ms"],
            "properties": {
                "model": {"type": "string"},
                "predictions": {"type": "array", "items": _ref("Class")},
                "time_ms": {"type": "number"},
            },
        },
        "Explanation": {
            "type": "object",
            "required": ["model", "predictions", "explained", "method", "layer", "overlay_png", "time_ms"],
            "properties": {
                "model": {"type": "string"},
                "predictions": {"type": "array", "items": _ref("Class")},
                "explained": {
                    "type": "object",
                    "description": "the class the heat map is for: the top prediction",
                    "properties": {"label": {"type": "string"}, "index": {"type": "integer"}},
                },
                "method": {"type": "string", "enum": ["grad-cam"]},
                "layer": {"type": "string", "description": "the network's layer whose feature map was used"},
                "overlay_png": {
                    "type": "string",
                    "contentEncoding": "base64",
                    "contentMediaType": "image/png",
                    "description": "the model's input (crop x crop) with the heat map blended over it",
                },
                "time_ms": {"type": "number"},
            },
        },
        "FileResult": {
            "type": "object",
            "required": ["filename"],
            "properties": {
                "filename": {"type": "string"},
                "predictions": {"type": "array", "items": _ref("Class")},
                "error": error_body,
                "status": {"type": "integer", "description": "the status this file alone would have had"},
            },
        },
        "MultiPrediction": {
            "type": "object",
            "required": ["model", "results", "time_ms"],
            "properties": {
                "model": {"type": "string"},
                "results": {"type": "array", "items": _ref("FileResult")},
                "time_ms": {"type": "number"},
            },
        },
        "Status": {"type": "object", "properties": {"status": {"type": "string"}}},
        "Version": {
            "type": "object",
            "required": ["version", "revision"],
            "properties": {
                "version": {"type": "string", "description": "the project's version (model/version.py)"},
                "revision": {
                    "type": ["string", "null"],
                    "description": "the source revision the image was built from, when known",
                },
            },
        },
        "Ready": {
            "type": "object",
            "properties": {
                "status": {"type": "string"},
                "models": {"type": "array", "items": {"type": "string"}},
                "default_model": {"type": "string"},
                "backend": {"type": "string", "enum": ["onnx", "torch"]},
                "device": {"type": "string", "enum": ["cpu", "cuda"]},
            },
        },
        "Models": {
            "type": "object",
            "properties": {
                "version": {"type": "string"},
                "default_model": {"type": "string"},
                "serving": {
                    "type": "object",
                    "description": "the backend and device chosen at start, and why",
                    "properties": {
                        "backend": {"type": "string"},
                        "device": {"type": "string"},
                        "reason": {"type": "string"},
                    },
                },
                "models": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "arch": {"type": "string"},
                            "num_classes": {"type": "integer"},
                            "class_names": {"type": "array", "items": {"type": "string"}},
                            "preprocessing": {"type": "object"},
                            "metrics": {"type": "object"},
                        },
                    },
                },
            },
        },
    }
