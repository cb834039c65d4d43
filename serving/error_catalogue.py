"""Every error code the service and its page know: status, when it happens, what a person reads.

The one place these live. serving/errors.py takes each code's HTTP status from here, serving/pages.py
(and through it static/app.js) the human messages, serving/openapi.py the response descriptions and
the enum of codes, and the docs' error table is rendered from here (``python -m serving.error_catalogue``;
tests/test_error_catalogue.py fails when the table in the docs differs from the rendering). An HTTP error
of another status (gunicorn's rarer refusals) is named after its reason phrase: 417 ``expectation_failed``.

Page messages may hold placeholders: {max_size}, {max_megapixels}, {max_files} and {top_k_max} are
filled on the server from the app's settings; {size}, {status} and {request_id} by app.js.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from model.images import MAX_JPEG_SCANS


@dataclass(frozen=True)
class ErrorKind:
    """One error code. ``status`` is None for the page's own errors, which the server never sends."""

    code: str
    status: int | None
    when: str  # when it happens, in Markdown: the docs' table and the OpenAPI response descriptions
    page: str | None = None  # what the web page shows; None: the API's own message
    http_default: bool = False  # the code of a Werkzeug or gunicorn error with this status (404, 405...)


NOT_AN_IMAGE = "This file is not an image. Choose a photo: JPEG, PNG, WebP, GIF, BMP or TIFF."

CATALOGUE: tuple[ErrorKind, ...] = (
    ErrorKind(
        "no_file",
        400,
        "no `file` field and no image body",
        "Choose a photo first: use the button, drop it on the box, or paste it.",
    ),
    ErrorKind("empty_file", 400, "the file has no bytes", "This file is empty."),
    ErrorKind(
        "bad_top_k",
        400,
        "`top_k` not an integer from 1 to `TOP_K_MAX`",
        "Choose between 1 and {top_k_max} results.",
    ),
    ErrorKind(
        "too_many_files",
        400,
        "more than `MAX_FILES` files (`POST /explain`: more than one)",
        "Too many photos at once: at most {max_files} per upload.",
    ),
    ErrorKind(
        "incomplete_body",
        400,
        "the raw body is shorter than its `Content-Length` (the client stopped, or was cut off as too slow)",
    ),
    ErrorKind(
        "bad_request",
        400,
        "a request Werkzeug or gunicorn cannot parse (e.g. a control byte in the request line)",
        http_default=True,
    ),
    ErrorKind(
        "unauthorized",
        401,
        "API key configured and missing or wrong (with `WWW-Authenticate: Bearer`)",
        "This server needs a valid API key.",
        http_default=True,
    ),
    ErrorKind(
        "model_not_found",
        404,
        "`model` is not one of the served names (see `GET /models`)",
        "That model is not available any more. Reload the page to see the current list.",
    ),
    ErrorKind("not_found", 404, "no such path", http_default=True),
    ErrorKind(
        "explanations_off",
        404,
        "`POST /explain` on a server started with `FLASK_EXPLAIN=off`",
        "Explanations are turned off on this server.",
    ),
    ErrorKind(
        "method_not_allowed",
        405,
        "e.g. `GET /predict` (with `Allow`)",
        "That did not work. Reload the page and try again.",
        http_default=True,
    ),
    ErrorKind(
        "payload_too_large",
        413,
        "body over `MAX_CONTENT_LENGTH`, also when streamed without `Content-Length`",
        "Too large to upload: the limit is {max_size} per upload.",
        http_default=True,
    ),
    ErrorKind(
        "too_many_pixels",
        413,
        "image over `MAX_IMAGE_PIXELS` (checked from the header, before decoding: decompression bombs)",
        "This image has too many pixels (the limit is {max_megapixels} megapixels). Try a smaller version.",
    ),
    ErrorKind(
        "too_many_total_pixels",
        413,
        "the images of one request together over `MAX_REQUEST_PIXELS` (counted from their headers, in the "
        "order sent, before any is decoded); a file past it gets this code in `results`, the others are answered",
        "This photo was sent together with others that already use up the pixels one upload may hold. "
        "Classify it on its own.",
    ),
    ErrorKind(
        "too_many_scans",
        413,
        f"a JPEG of more than {MAX_JPEG_SCANS} scans (libjpeg decodes the whole image once per scan; encoders "
        "write at most about 10), counted before decoding",
        "This JPEG is stored in an unusual way that is too costly to decode. Save it again as an ordinary JPEG or PNG.",
    ),
    ErrorKind(
        "uri_too_long",
        414,
        "a request line over gunicorn's `limit_request_line` (answered by gunicorn)",
        http_default=True,
    ),
    ErrorKind("not_an_image", 415, "the bytes are not an image", NOT_AN_IMAGE),
    ErrorKind(
        "unsupported_format",
        415,
        "an image format that is not accepted (e.g. PPM, ICO)",
        "This image format is not supported. Use JPEG, PNG, WebP, GIF, BMP or TIFF.",
    ),
    ErrorKind(
        "unsupported_media_type",
        415,
        "a body that is neither multipart nor `image/*` (e.g. JSON)",
        NOT_AN_IMAGE,
        http_default=True,
    ),
    ErrorKind(
        "corrupt_image",
        422,
        "an accepted format whose data is truncated or corrupt",
        "This image looks damaged or incomplete, so it cannot be read.",
    ),
    ErrorKind(
        "unconvertible_image",
        422,
        "decoded, but its pixel mode cannot be converted for the model",
        "The colours of this image cannot be converted. Try saving it as JPEG or PNG.",
    ),
    ErrorKind(
        "explanation_unsupported",
        422,
        "`POST /explain` for a model Grad-CAM cannot explain: a transformer (ViT, Swin, MaxViT), which has no "
        "convolutional feature map near its head",
        "This model cannot show why: heat maps work only for convolutional networks.",
    ),
    ErrorKind(
        "request_header_fields_too_large",
        431,
        "more or larger headers than gunicorn's limits (answered by gunicorn)",
        http_default=True,
    ),
    ErrorKind(
        "internal_error",
        500,
        "anything unexpected; the error has a `request_id` (also in `X-Request-ID`), the traceback is only in the log",
        "Something went wrong on the server. If it keeps happening, quote request id {request_id}.",
    ),
    ErrorKind(
        "not_ready",
        503,
        "the models are still loading, or the worker is shutting down",
        "The server is busy or still starting. Please try again in a moment.",
        http_default=True,
    ),
    ErrorKind(
        "busy",
        503,
        "the worker has `MAX_INFLIGHT` requests in progress and no slot freed up within `ADMISSION_WAIT_MS` "
        "(or its waiting room is full); with `Retry-After`. Also: inference did not finish within the "
        "batcher's time limit",
        "The server is busy. Please try again in a moment.",
    ),
    # the page's own errors (static/app.js), found before or instead of an answer from the server
    ErrorKind(
        "file_too_large",
        None,
        "a chosen file is over the upload limit",
        "This photo is {size}, too large to upload: the limit is {max_size}.",
    ),
    ErrorKind(
        "network",
        None,
        "the server cannot be reached",
        "Could not reach the server. Check your connection and try again.",
    ),
    ErrorKind(
        "unexpected",
        None,
        "an answer that is not the API's JSON",
        "The server gave an unexpected answer (HTTP {status}). Please try again.",
    ),
)

ERRORS: dict[str, ErrorKind] = {kind.code: kind for kind in CATALOGUE}
# the codes the server sends, in the order of the table
SERVER_ERRORS: tuple[ErrorKind, ...] = tuple(
    sorted((kind for kind in CATALOGUE if kind.status is not None), key=lambda kind: kind.status or 0)
)
# the code of each status Werkzeug or gunicorn raise themselves
HTTP_ERROR_CODES: dict[int, str] = {
    kind.status: kind.code for kind in SERVER_ERRORS if kind.http_default and kind.status is not None
}
PAGE_MESSAGES: dict[str, str] = {kind.code: kind.page for kind in CATALOGUE if kind.page is not None}


def status_of(code: str) -> int:
    status = ERRORS[code].status
    if status is None:
        raise ValueError(f"{code} is one of the page's own errors; the server never sends it")
    return status


def codes_with_status(status: int) -> list[str]:
    return [kind.code for kind in SERVER_ERRORS if kind.status == status]


def markdown_table(kinds: Iterable[ErrorKind] = SERVER_ERRORS) -> str:
    """The docs' error table: one row per code the server sends."""
    rows = ["| status | code | when |", "|---|---|---|"]
    rows += [f"| {kind.status} | `{kind.code}` | {kind.when} |" for kind in kinds]
    return "\n".join(rows) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Print the service's error catalogue.")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_const", dest="format", const="markdown", help="the docs' table")
    fmt.add_argument("--json", action="store_const", dest="format", const="json", help="every code, as JSON")
    p.set_defaults(format="markdown")
    return p


def main(args: argparse.Namespace) -> str:
    if args.format == "json":
        return json.dumps([asdict(kind) for kind in CATALOGUE], indent=2) + "\n"
    return markdown_table()


if __name__ == "__main__":
    print(main(get_args_parser().parse_args()), end="")  # noqa: T201 - a CLI whose output is the table
