"""The one-pass multipart parser (serving/multipart.py) against Werkzeug's: the same fields, files and
errors for what real clients send, for odd and malformed bodies, and for randomly damaged ones."""

from __future__ import annotations

import io
import random
from typing import Any

import pytest
import requests
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header
from werkzeug.test import EnvironBuilder

from serving.multipart import InMemoryFormDataParser, parse_multipart

LIMITS = {"max_form_memory_size": 500_000, "max_form_parts": 1000}  # Flask's defaults
B = b"b0undary-42"
LATIN1 = b"iso-8859-1"


def outcome(parser_class: type[FormDataParser], body: bytes, content_type: str) -> Any:
    mimetype, options = parse_options_header(content_type)
    parser = parser_class(max_content_length=None, **LIMITS)
    try:
        _, form, files = parser.parse(io.BytesIO(body), mimetype, len(body), options)
    except RequestEntityTooLarge:
        return "413"
    return (
        list(form.items(multi=True)),
        [(k, f.filename, f.content_type, f.read()) for k, f in files.items(multi=True)],
    )


def requests_body(files: Any, data: Any = None) -> tuple[bytes, str]:
    prepared = requests.Request("POST", "http://x/predict", files=files, data=data).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def werkzeug_body(data: dict[str, Any]) -> tuple[bytes, str]:
    environ = EnvironBuilder(method="POST", data=data).get_environ()
    return environ["wsgi.input"].read(), environ["CONTENT_TYPE"]


def raw(*parts: bytes, end: bytes = b"--" + B + b"--\r\n", pre: bytes = b"") -> tuple[bytes, str]:
    body = pre + b"".join(b"--" + B + b"\r\n" + p + b"\r\n" for p in parts) + end
    return body, f"multipart/form-data; boundary={B.decode()}"


def part(name: str, data: bytes, filename: str | None = None, *extra: bytes) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return b"\r\n".join([disposition.encode(), *extra, b"", data])


PHOTO = bytes(random.Random(0).randrange(256) for _ in range(70_000)) + b"\r\n--b0undary-4\r\n\r--"

# what clients send: the fast path must parse these itself, and agree with Werkzeug
CLEAN = {
    "requests_file_and_field": requests_body({"file": ("cat.jpg", PHOTO, "image/jpeg")}, {"top_k": "2"}),
    "requests_two_files": requests_body([("file", ("a.png", b"\x89PNG1")), ("file", ("b.png", b"\x89PNG2"))]),
    "requests_unicode_name": requests_body({"file": ("chat-ébène 🐈.png", b"png")}),
    "werkzeug_file_and_field": werkzeug_body({"file": (io.BytesIO(PHOTO), "x.png"), "model": "default"}),
    "raw_curl_like": raw(part("file", PHOTO, "x.jpg", b"Content-Type: image/jpeg")),
    "raw_latin1_field": raw(
        part("note", "café".encode("latin-1"), None, b"Content-Type: text/plain; charset=" + LATIN1)
    ),
    "raw_long_filename": raw(part("file", b"x", "a" * 5000 + ".png")),
    "raw_filename_star": raw(
        b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''%C3%A9t%C3%A9.png\r\n\r\nx"
    ),
    "raw_epilogue": raw(part("file", b"x", "a.png"), end=b"--" + B + b"--\r\nanything after the end\r\n"),
    "raw_empty_file_with_line_break": raw(part("file", b"", "a.png")),
}
# odd or malformed: Werkzeug decides (the fast path may hand them over)
ODD = {
    "werkzeug_empty_file": werkzeug_body({"file": (io.BytesIO(b""), "e.png")}),
    "raw_preamble_text": raw(part("file", b"x", "a.png"), pre=b"this is a preamble\r\n"),
    "raw_lf_only": (
        b"--" + B + b'\nContent-Disposition: form-data; name="file"; filename="a"\n\nxyz\n--' + B + b"--\n",
        f"multipart/form-data; boundary={B.decode()}",
    ),  # fmt: skip
    "raw_no_disposition": raw(b"Content-Type: image/png\r\n\r\nxyz"),
    "raw_truncated": raw(part("file", PHOTO[:1000], "a.png"), end=b""),
    "raw_no_boundary_param": (raw(part("file", b"x", "a.png"))[0], "multipart/form-data"),
    "raw_wrong_boundary": (raw(part("file", b"x", "a.png"))[0], "multipart/form-data; boundary=other"),
    "raw_too_many_parts": raw(*[part("f", b"1") for _ in range(1001)]),
    "raw_field_too_large": raw(part("note", b"n" * 500_001)),
    "raw_file_larger_than_field_limit": raw(part("file", b"n" * 600_000, "big.bin")),
    "raw_headers_too_large": raw(part("file", b"x", "a" * 600_000)),
    "raw_many_small_headers": raw(part("file", b"x", "a.png", *[b"X-%d: %s" % (i, b"v" * 90) for i in range(6000)])),
    "raw_some_extra_headers": raw(part("file", b"x", "a.png", *[b"X-%d: v" % i for i in range(100)])),
    "raw_headers_only": raw(b'Content-Disposition: form-data; name="file"; filename="a"'),
    "raw_empty_body": (b"", f"multipart/form-data; boundary={B.decode()}"),
}


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_bodies_parse_on_the_fast_path_as_werkzeug_does(name: str) -> None:
    body, ctype = CLEAN[name]
    boundary = parse_options_header(ctype)[1]["boundary"].encode()
    form, files = parse_multipart(body, boundary, **LIMITS)  # raises if it handed the body over
    assert files or form
    assert outcome(InMemoryFormDataParser, body, ctype) == outcome(FormDataParser, body, ctype)


def test_the_photo_survives_byte_for_byte() -> None:
    body, ctype = CLEAN["requests_file_and_field"]
    _, files = outcome(InMemoryFormDataParser, body, ctype)
    assert files == [("file", "cat.jpg", "image/jpeg", PHOTO)]


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_bodies_get_werkzeugs_answer(name: str) -> None:
    body, ctype = ODD[name]
    assert outcome(InMemoryFormDataParser, body, ctype) == outcome(FormDataParser, body, ctype)


def test_limits_answer_413_like_werkzeug() -> None:
    assert outcome(InMemoryFormDataParser, *ODD["raw_too_many_parts"]) == "413"
    assert outcome(InMemoryFormDataParser, *ODD["raw_field_too_large"]) == "413"
    assert outcome(InMemoryFormDataParser, *ODD["raw_file_larger_than_field_limit"]) != "413"  # files: no field limit
    assert outcome(InMemoryFormDataParser, *ODD["raw_headers_too_large"]) == "413"
    assert outcome(InMemoryFormDataParser, *ODD["raw_many_small_headers"]) == "413"  # 600 KB of headers in all


def test_a_latin1_field_is_decoded_as_latin1() -> None:
    assert outcome(InMemoryFormDataParser, *CLEAN["raw_latin1_field"])[0] == [("note", "café")]


def test_randomly_damaged_bodies_agree_with_werkzeug() -> None:
    """Bytes flipped, inserted, deleted or cut in real bodies: every outcome is Werkzeug's."""
    rng = random.Random(1234)
    seeds = [CLEAN[k] for k in ("requests_file_and_field", "requests_two_files", "raw_latin1_field")]
    seeds = [(body[:3000] + body[-300:] if len(body) > 4000 else body, ctype) for body, ctype in seeds]
    checked = 0
    for _ in range(600):
        body, ctype = rng.choice(seeds)
        data = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data))
            kind = rng.choice(["flip", "insert", "delete", "cut", "crlf"])
            if kind == "flip":
                data[where] = rng.randrange(256)
            elif kind == "insert":
                data[where:where] = rng.choice([b"\r\n", b"--", B, b"\r\n--" + B, b'"', b";", b"\n"])
            elif kind == "delete":
                del data[where : where + rng.randint(1, 8)]
            elif kind == "cut":
                del data[where:]
            else:
                data[where:where] = b"\r\n"
            if not data:
                data = bytearray(b"-")
        mine, theirs = outcome(InMemoryFormDataParser, bytes(data), ctype), outcome(FormDataParser, bytes(data), ctype)
        assert mine == theirs, bytes(data)
        checked += 1
    assert checked == 600
