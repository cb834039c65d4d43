"""The web page: ``GET /`` serves the upload form; ``POST /`` is its no-JavaScript path.

With JavaScript on, static/app.js posts the same form to /predict and draws the JSON answer; with it
off, the browser posts here, and the same steps as /predict (serving.api: read_uploads, pick_model,
parse_top_k, classify) answer with a page rendered on the server. Errors on these routes are rendered
as the page with a human message instead of JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from functools import cache
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request, url_for

from model import version as release
from serving.admission import admitted
from serving.api import classify, parse_top_k, pick_model, read_uploads, registry
from serving.error_catalogue import PAGE_MESSAGES
from serving.errors import ApiError, handle_error
from serving.http import content_security_policy

bp = Blueprint("pages", __name__)


@bp.app_context_processor
def _version() -> dict[str, str]:
    """Every page shows which version answers (footer)."""
    return {"version": release.__version__}


# Added to the headers every response gets in serving/http.py (nosniff, Referrer-Policy, X-Frame-Options,
# CORP), which only sets what is not already set; the CSP comes from its content_security_policy().
# No inline script or style anywhere: the page's JS and CSS are files under static/; previews are blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": content_security_policy(
        default_src="'self'", img_src="'self' blob: data:", object_src="'none'", form_action="'self'"
    ),
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# headers of an error answer the page keeps: when to retry (503 busy)
KEPT_ERROR_HEADERS = ("Retry-After",)


@bp.after_request
def _page_headers(response: Response) -> Response:
    if response.mimetype == "text/html":
        response.headers.update(PAGE_HEADERS)
    return response


@bp.get("/")
def index() -> str:
    return render_page()


@bp.post("/")
@admitted
def classify_form() -> tuple[str, int]:
    """The form posted without JavaScript: same inference as /predict, answered with the page."""
    started = time.perf_counter()
    check_form_api_key()
    uploads = [(name, data) for name, data in read_uploads() if name or data]
    if not uploads:  # a browser sends one empty part when no file was chosen
        raise ApiError("no_file", "no file chosen")
    served = pick_model(request.form.get("model"))
    top_k = parse_top_k(request.form.get("top_k"))
    outcomes = classify(served, uploads, top_k)
    time_ms = round((time.perf_counter() - started) * 1000, 1)
    results = []
    status = 200
    for (filename, _), outcome in zip(uploads, outcomes, strict=True):
        entry: dict[str, Any] = {"filename": filename or "photo", "model": served.name, "time_ms": time_ms}
        if isinstance(outcome, ApiError):
            entry["error"] = human_message(outcome.code, outcome.message)
            status = outcome.status if len(uploads) == 1 else 200  # as /predict: one file, its own status
        else:
            entry["predictions"] = outcome
        results.append(entry)
    return render_page(results=results, chosen_model=served.name, chosen_top_k=top_k), status


@bp.errorhandler(Exception)
def page_error(exc: Exception) -> tuple[str, int, dict[str, str]]:
    """The API's error handling (status, code, logging, request id), shown as the page with a message."""
    response = handle_error(exc)
    error = response.get_json()["error"]
    message = human_message(error["code"], error["message"]).replace("{request_id}", error.get("request_id", "-"))
    kept = {name: response.headers[name] for name in KEPT_ERROR_HEADERS if name in response.headers}
    return render_page(error=message), response.status_code, kept


def check_form_api_key() -> None:
    """A browser form cannot send an Authorization header: with a key configured, it comes as a field."""
    key = current_app.config["API_KEY"]
    if key and not hmac.compare_digest(request.form.get("api_key", "").encode(), key.encode()):
        raise ApiError("unauthorized", "the API key is missing or not valid")


def human_message(code: str, fallback: str) -> str:
    return page_messages().get(code, fallback)


def page_messages() -> dict[str, str]:
    """The catalogue's page messages with this server's limits filled in (app.js fills the rest)."""
    cfg = current_app.config
    known = {
        "max_size": format_bytes(cfg["MAX_CONTENT_LENGTH"]),
        "max_megapixels": f"{cfg['MAX_IMAGE_PIXELS'] / 1e6:g}",
        "max_files": str(cfg["MAX_FILES"]),
        "top_k_max": str(cfg["TOP_K_MAX"]),
    }
    filled = {}
    for code, text in PAGE_MESSAGES.items():
        for name, value in known.items():
            text = text.replace("{" + name + "}", value)
        filled[code] = text
    return filled


def format_bytes(n: int) -> str:
    """Sizes as app.js writes them: 10485760 -> "10 MB"."""
    if n < 1024:
        return f"{n} bytes"
    value, unit = (n / 1024, "KB") if n < 1024 * 1024 else (n / 1024 / 1024, "MB")
    return f"{float(f'{value:.3g}'):g} {unit}"


def render_page(
    *,
    results: list[dict[str, Any]] | None = None,
    error: str | None = None,
    chosen_model: str | None = None,
    chosen_top_k: int | None = None,
) -> str:
    cfg = current_app.config
    reg = registry()
    models = [served.describe() for served in reg.models.values()]
    for info in models:
        info.pop("class_names", None)  # up to thousands of labels the page does not need
    upload_sides = {info["name"]: upload_side(info["preprocessing"]) for info in models}
    return render_template(
        "index.html",
        models=models,
        default_model=reg.default,
        chosen_model=chosen_model or reg.default,
        top_k_max=cfg["TOP_K_MAX"],
        chosen_top_k=chosen_top_k or cfg["TOP_K_DEFAULT"],
        max_bytes=cfg["MAX_CONTENT_LENGTH"],
        max_size=format_bytes(cfg["MAX_CONTENT_LENGTH"]),
        max_files=cfg["MAX_FILES"],
        upload_side=upload_sides.get(reg.default, 0),
        upload_sides=upload_sides,
        api_key_required=bool(cfg["API_KEY"]),
        explain=cfg["EXPLAIN"],
        messages=page_messages(),
        results=results or [],
        error=error,
        asset=asset_url,
    )


def upload_side(preprocessing: dict[str, Any]) -> int:
    """The short side app.js cuts a large photo to before upload: twice the model's input, so the
    server's own resize to ``resize`` and crop to ``crop`` still start from more pixels than they keep."""
    return max(2 * int(preprocessing["crop"]), int(preprocessing["resize"]))


def asset_url(filename: str) -> str:
    """The static file's URL with a content hash, so a new release is never mixed with cached files."""
    return url_for("static", filename=filename, v=_content_hash(Path(current_app.static_folder or "static") / filename))


@cache
def _content_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
