"""One JSON error shape for everything: ``{"error": {"code", "message"}}`` with the right status.

Expected failures raise ``ApiError`` with a code of serving/error_catalogue.py, which gives its status;
Werkzeug's HTTP errors (404, 405, 413...) keep their status and headers; anything else is a 500 that
carries the request id, with the traceback only in the log.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from model.images import ImageDecodeError
from serving.error_catalogue import ERRORS, HTTP_ERROR_CODES, status_of

__all__ = ["HTTP_ERROR_CODES", "ApiError", "handle_error", "register_error_handler"]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A failure the client can act on; ``code`` is stable (and sets the status), ``message`` is for people."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None, *, status: int | None = None):
        super().__init__(message)
        self.status = status if status is not None else status_of(code)
        self.code = code
        self.message = message
        self.headers = headers or {}

    @classmethod
    def from_image_error(cls, exc: ImageDecodeError) -> ApiError:
        # 415: the bytes are not an image of a type we take; 422: an image type we take, but the data
        # cannot be used. A decoding failure the catalogue does not know yet is a 422.
        return cls(exc.code, exc.message, status=status_of(exc.code) if exc.code in ERRORS else 422)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def register_error_handler(app: Flask) -> None:
    app.register_error_handler(Exception, handle_error)


def handle_error(exc: Exception) -> tuple[Response, int] | Response:
    if isinstance(exc, ApiError):
        error = exc
    elif isinstance(exc, HTTPException) and exc.code is not None and exc.code < 500:
        code = HTTP_ERROR_CODES.get(exc.code, (exc.name or "error").lower().replace(" ", "_"))
        headers = {k: v for k, v in exc.get_headers() if k.lower() not in ("content-type", "content-length")}
        message = exc.description or exc.name
        if exc.code == 413:
            limit = current_app.config.get("MAX_CONTENT_LENGTH") or 0
            message = f"the request body is larger than the limit of {limit:,} bytes"
        error = ApiError(code, message, headers, status=exc.code)
    else:
        request_id = g.get("request_id", "-")
        logger.exception("unexpected error on %s %s (request id %s)", request.method, request.path, request_id)
        error = ApiError("internal_error", f"unexpected server error; quote request id {request_id} when reporting it")
    if error.status >= 400 and error.status != 500:
        logger.info("%s %s -> %d %s: %s", request.method, request.path, error.status, error.code, error.message)
    body = error.body()
    if error.status == 500:
        body["error"]["request_id"] = g.get("request_id", "-")
    response = jsonify(body)
    response.status_code = error.status
    response.headers.update(error.headers)
    return response
