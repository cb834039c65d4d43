"""The error catalogue is the one source: the docs' table, the page's messages, the OpenAPI document and
every code the code raises come from serving/error_catalogue.py."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys

import pytest

from serving.error_catalogue import CATALOGUE, ERRORS, PAGE_MESSAGES, SERVER_ERRORS, markdown_table
from serving.errors import ApiError
from serving.openapi import EXPLAIN_ONLY_ERRORS
from tests.support import ROOT
from tests.support.service import closing_app

# The document holding the error table, between <!-- errors:start --> and <!-- errors:end -->.
ERROR_TABLE_DOC = ROOT / "docs" / "service.md"
TABLE = re.compile(r"<!-- errors:start -->\n(.*?)<!-- errors:end -->", re.S)


def test_the_docs_error_table_is_the_catalogue() -> None:
    tables = TABLE.findall(ERROR_TABLE_DOC.read_text())
    assert len(tables) == 1, f"{ERROR_TABLE_DOC.name} needs one <!-- errors:start/end --> pair"
    assert tables[0] == markdown_table(), "regenerate it: python -m serving.error_catalogue --markdown"


def test_the_table_lists_every_code_the_server_sends_once() -> None:
    rows = re.findall(r"^\| (\d{3}) \| `(\w+)` \| .+ \|$", markdown_table(), re.M)
    assert [(int(status), code) for status, code in rows] == [(kind.status, kind.code) for kind in SERVER_ERRORS]
    assert len({code for _, code in rows}) == len(rows)
    assert [status for status, _ in rows] == sorted(status for status, _ in rows)
    assert "file_too_large" not in {code for _, code in rows}  # the page's own errors are not the API's


def test_the_command_line_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serving.error_catalogue", "--markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == markdown_table()


def test_codes_are_unique_and_statuses_are_errors() -> None:
    assert len(ERRORS) == len(CATALOGUE)
    for kind in CATALOGUE:
        assert re.fullmatch(r"[a-z_]+", kind.code)
        assert kind.status is None or 400 <= kind.status <= 599
        assert kind.when and (kind.status is not None or kind.page), kind.code


def test_every_code_raised_in_the_service_is_in_the_catalogue() -> None:
    raised = set()
    for path in (ROOT / "serving").glob("*.py"):
        raised |= set(re.findall(r"ApiError\(\s*\"(\w+)\"", path.read_text()))
    assert {"no_file", "not_ready", "busy", "unconvertible_image"} <= raised  # the search finds them
    assert raised <= {kind.code for kind in SERVER_ERRORS}
    with pytest.raises(KeyError):
        ApiError("no_such_code", "a code the catalogue lacks fails where it is raised")
    assert ApiError("too_many_pixels", "x").status == 413


def test_every_message_code_of_the_page_script_is_in_the_catalogue() -> None:
    script = (ROOT / "static" / "app.js").read_text()
    used = set(re.findall(r"message\(\"(\w+)\"", script))
    assert {"no_file", "network", "file_too_large", "unexpected"} <= used
    assert used <= set(PAGE_MESSAGES)


def test_page_and_openapi_read_the_catalogue(make_model_folder) -> None:
    with closing_app({"MODEL_DIR": str(make_model_folder("catalogue-models"))}) as app:
        client = app.test_client()
        page = client.get("/").get_data(as_text=True)
        doc = client.get("/openapi.json").get_json()
    shown = json.loads(html.unescape(re.search(r'data-messages="([^"]*)"', page).group(1)))
    assert set(shown) == set(PAGE_MESSAGES)
    for code, text in PAGE_MESSAGES.items():
        if not re.search(r"\{(max_size|max_megapixels|max_files|top_k_max)\}", text):
            assert shown[code] == text, code
    assert shown["bad_top_k"] == "Choose between 1 and 20 results."  # {top_k_max} filled from the settings
    assert shown["file_too_large"].endswith("the limit is 10 MB.")  # {size} is left for app.js
    responses = doc["paths"]["/predict"]["post"]["responses"]
    for kind in SERVER_ERRORS:
        if kind.code not in ("not_found", *EXPLAIN_ONLY_ERRORS):
            assert f"`{kind.code}`: {kind.when}" in responses[str(kind.status)]["description"]
    explain = doc["paths"]["/explain"]["post"]["responses"]
    for kind in SERVER_ERRORS:
        listed = f"`{kind.code}`: {kind.when}" in explain.get(str(kind.status), {}).get("description", "")
        assert listed == (kind.code not in ("not_found", "too_many_total_pixels")), kind.code
    predict_codes = {code for r in responses.values() for code in re.findall(r"`(\w+)`", r["description"])}
    assert not set(EXPLAIN_ONLY_ERRORS) & predict_codes
    assert "`not_ready`" in doc["paths"]["/readyz"]["get"]["responses"]["503"]["description"]
    code_schema = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert code_schema["examples"] == [kind.code for kind in SERVER_ERRORS]
