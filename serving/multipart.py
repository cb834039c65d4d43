"""multipart/form-data parsed in one pass over the body, by python-multipart (Starlette's parser).

Werkzeug's parser compiles two regular expressions from each request's boundary (a fresh random one per
request, so never cached) and runs the body through them 64 KB at a time: a few hundred microseconds of
CPU for a small photo and milliseconds for a phone photo, more than HTTP, routing and JSON together. The
service keeps uploads in memory anyway, capped by MAX_CONTENT_LENGTH (``serving.http.InMemoryRequest``),
so the body is read at once and handed to python-multipart in one call, whose boundary search is
``bytes.find``. What the app sees does not change: ``request.form`` and ``request.files`` (FileStorage),
Werkzeug's limits (MAX_FORM_MEMORY_SIZE per field, MAX_FORM_PARTS; 413 for either) and its silent
answer to a malformed body (no fields, no files). Other form types go to Werkzeug's own parser.
"""

from __future__ import annotations

import io
import logging
from typing import IO, Any

from python_multipart.multipart import MultipartParser
from werkzeug.datastructures import FileStorage, Headers, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.http import parse_options_header

# python-multipart logs a warning for every malformed body; a client's bad body is answered (by Werkzeug's
# parser, which then decides, and logs nothing), it is not something for the operator to act on
logging.getLogger("python_multipart").setLevel(logging.ERROR)
_HEADER_LIMIT = 500 * 1024  # Werkzeug's default MAX_FORM_MEMORY_SIZE, when none is set
_HEADER_COUNT = 64  # headers per part read here; a part with more goes to Werkzeug's parser
_CHARSETS = MultiPartParser()  # only for Werkzeug's choice of a text field's charset (get_part_charset)


class _Part:
    __slots__ = ("headers", "header_bytes", "chunks", "size")

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0
        self.chunks: list[bytes] = []
        self.size = 0


def parse_multipart(
    body: bytes,
    boundary: bytes,
    *,
    max_form_memory_size: int | None = None,
    max_form_parts: int | None = None,
    cls: type[MultiDict[str, Any]] = MultiDict,
) -> tuple[MultiDict[str, str], MultiDict[str, FileStorage]]:
    """(form fields, files) of a whole multipart body; ValueError when it is malformed."""
    if not boundary:
        raise ValueError("Missing boundary")
    # Werkzeug bounds a part's header block only by MAX_FORM_MEMORY_SIZE (413 beyond it); python-multipart's
    # defaults (8 headers of 4 KB) would turn away what Werkzeug takes (a long file name), so its header
    # size follows that bound and the bytes of all a part's headers are counted against it too.
    header_limit = max_form_memory_size or _HEADER_LIMIT
    parts: list[_Part] = []
    field: list[bytes] = []
    value: list[bytes] = []
    ended: list[bool] = []

    def part_begin() -> None:
        if max_form_parts is not None and len(parts) >= max_form_parts:
            raise RequestEntityTooLarge()
        parts.append(_Part())

    def header_end() -> None:
        part = parts[-1]
        part.header_bytes += sum(map(len, field)) + sum(map(len, value))
        if part.header_bytes > header_limit:  # Werkzeug's bound on a part's header block, and its answer
            raise RequestEntityTooLarge()
        name, text = b"".join(field).decode(), b"".join(value).decode()  # UTF-8, as Werkzeug decodes them
        part.headers.append((name.strip(" \t"), text.strip(" \t")))
        field.clear()
        value.clear()

    def part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.chunks.append(data[start:end])
        part.size += end - start

    callbacks: Any = {
        "on_part_begin": part_begin,
        "on_header_field": lambda data, start, end: field.append(data[start:end]),
        "on_header_value": lambda data, start, end: value.append(data[start:end]),
        "on_header_end": header_end,
        "on_part_data": part_data,
        "on_end": lambda: ended.append(True),
    }
    parser = MultipartParser(boundary, callbacks, max_header_count=_HEADER_COUNT, max_header_size=header_limit)
    start = body.find(b"--" + boundary)  # a preamble (Werkzeug's test client writes a line break) is skipped
    parser.write(body[start:] if start > 0 else body)
    parser.finalize()
    if not ended:  # python-multipart lets a body without its closing delimiter end its last part
        raise ValueError("no closing boundary")
    if body.count(b"--" + boundary) != len(parts) + 1:
        # a boundary python-multipart read as data (say, with a stray byte after it): Werkzeug may read
        # it as a delimiter, so such a body is not decided here
        raise ValueError("a boundary inside a part")

    fields, files = [], []
    for part in parts:
        headers = Headers(part.headers)
        if "content-disposition" not in headers:
            raise ValueError("Missing Content-Disposition header")
        _, extra = parse_options_header(headers["content-disposition"])
        name, filename = extra.get("name"), extra.get("filename")
        data = part.chunks[0] if len(part.chunks) == 1 else b"".join(part.chunks)
        if filename is not None:
            files.append((name, FileStorage(io.BytesIO(data), filename, name, headers=headers)))
            continue
        if max_form_memory_size is not None and part.size > max_form_memory_size:
            raise RequestEntityTooLarge()
        fields.append((name, data.decode(_CHARSETS.get_part_charset(headers), "replace")))
    return cls(fields), cls(files)


class InMemoryFormDataParser(FormDataParser):
    """Werkzeug's form parser, with multipart bodies read whole and parsed by ``parse_multipart`` first.

    python-multipart is stricter than Werkzeug (it refuses a preamble before the first boundary, or an
    empty part that Werkzeug's own test client writes without its line break), so a body it refuses
    is parsed again by Werkzeug's parser, which decides: the fast path never turns away what Werkzeug
    takes, and a malformed body gets Werkzeug's answer.
    """

    def parse(
        self, stream: IO[bytes], mimetype: str, content_length: int | None, options: dict[str, str] | None = None
    ) -> tuple[IO[bytes], MultiDict[str, Any], MultiDict[str, Any]]:
        if mimetype != "multipart/form-data":
            return super().parse(stream, mimetype, content_length, options)
        body = stream.read()
        try:
            boundary = (options or {}).get("boundary", "").encode("ascii")
            form, files = parse_multipart(body, boundary, max_form_memory_size=self.max_form_memory_size,
                                          max_form_parts=self.max_form_parts, cls=self.cls)  # fmt: skip
        except ValueError:
            _, form, files = super().parse(io.BytesIO(body), mimetype, len(body), options)
        return stream, form, files
