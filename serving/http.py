"""What happens around every request: uploads kept in memory, a request id, timing, metrics, headers."""

from __future__ import annotations

import io
import re
import time
import uuid
from typing import IO, Any

from flask import Flask, Request, Response, current_app, g, request

from serving.metrics import OTHER, Metrics
from serving.multipart import InMemoryFormDataParser

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# The one place for security headers. Every response gets them; a view may set its own
# Content-Security-Policy (the HTML page needs scripts, styles, images) with content_security_policy(),
# and framing stays forbidden whatever it sets.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# JSON answers load nothing, so nothing is allowed.
CSP_DEFAULTS = {
    "default-src": "'none'",
    "base-uri": "'none'",
    "form-action": "'none'",
    "frame-ancestors": "'none'",
}


def content_security_policy(**directives: str) -> str:
    """A CSP header value: the defaults above with ``directives`` (``script_src="'self'"``) on top;
    ``frame-ancestors 'none'`` always stays."""
    merged = dict(CSP_DEFAULTS)
    merged.update({name.replace("_", "-"): value for name, value in directives.items()})
    merged["frame-ancestors"] = "'none'"
    return "; ".join(f"{name} {value}" for name, value in merged.items())


DEFAULT_CSP = content_security_policy()


class InMemoryRequest(Request):
    """Uploaded files stay in memory: Werkzeug would spool parts over 500 KB to a temporary file.

    The body is already capped by MAX_CONTENT_LENGTH (10 MB by default), so memory stays bounded; a
    multipart body is read whole and parsed in one pass (``serving.multipart``).
    """

    form_data_parser_class = InMemoryFormDataParser

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return io.BytesIO()


def install_request_hooks(app: Flask) -> None:
    app.request_class = InMemoryRequest
    app.before_request(_start)
    app.after_request(_finish)


def metrics_of(app: Flask) -> Metrics:
    return app.extensions["imgclf.metrics"]


def _start() -> None:
    g.started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex


def _finish(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "-")
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    csp = response.headers.get("Content-Security-Policy")
    if csp is None:
        response.headers["Content-Security-Policy"] = DEFAULT_CSP
    elif "frame-ancestors" not in csp:  # a view's own policy: framing is still forbidden
        response.headers["Content-Security-Policy"] = csp.rstrip("; ") + "; frame-ancestors 'none'"
    if response.mimetype == "application/json":  # answers about one upload are not for caches
        response.headers.setdefault("Cache-Control", "no-store")
    started: Any = g.get("started")
    if started is not None:
        # the matched route's rule (one of the app's), never the path the client sent
        endpoint = request.url_rule.rule if request.url_rule is not None else OTHER
        metrics_of(current_app).observe_request(
            endpoint, request.method, response.status_code, time.perf_counter() - started
        )
    return response
