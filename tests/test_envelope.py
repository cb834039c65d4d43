"""The production envelope's small guarantees: bounded metric labels, an API key that fails closed, and log
lines a client cannot forge. Each is checked through the Flask app and against real gunicorn."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
from pathlib import Path

import pytest
import requests
from PIL import Image

from app import create_app
from serving.config import API_KEY_MIN_LENGTH, ConfigError
from serving.launcher import GunicornServer
from serving.logs import EscapeControl, escape_control
from tests.support.bundles import tiny_bundle
from tests.support.hostile import multipart
from tests.support.images import image_bytes
from tests.support.service import closing_app, logs_of_failed_starts, metric_samples

TINY_CLASSES = ["red square", "green circle", "blue star"]
REQUESTS_METRIC = "imgclf_http_requests_total"
LATENCY_METRIC = "imgclf_http_request_duration_seconds_count"
MADE_UP_METHODS = [f"QZ{i:04d}" for i in range(1, 51)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("envelope-tiny")
    tiny_bundle(folder / "tiny.pth", TINY_CLASSES)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, make_model_folder):
    folder = make_model_folder("envelope-models")
    srv = GunicornServer(folder, tmp_path_factory.mktemp("envelope-logs") / "gunicorn.log", threads=2)
    srv.start()
    yield srv
    srv.stop()


def raw_request(port: int, request: bytes) -> bytes:
    """Send bytes as they are (a made-up method, a control character) and return the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def series(text: str) -> set[str]:
    return set(metric_samples(text, REQUESTS_METRIC)) | set(metric_samples(text, LATENCY_METRIC))


def png() -> bytes:
    return image_bytes(Image.new("RGB", (40, 30), "green"), "PNG")


# --- item 3: metric labels from fixed sets


def test_made_up_methods_and_paths_add_no_series_in_the_app(tiny_dir: Path) -> None:
    with closing_app({"MODEL_DIR": str(tiny_dir), "DEFAULT_MODEL": "tiny"}) as app:
        client = app.test_client()
        assert client.open("/healthz", method="QZ0000").status_code == 405  # the first of each kind
        client.open("/predict/0", method="QZ0000")
        client.get("/no-such-page-0000")
        client.get("/metrics")  # a scrape is counted after it answered
        before = series(client.get("/metrics").get_data(as_text=True))
        for i, method in enumerate(MADE_UP_METHODS, start=1):
            assert client.open("/healthz", method=method).status_code == 405
            assert client.open(f"/predict/{i}", method=method).status_code in (404, 405)
            assert client.get(f"/no-such-page-{i:04d}").status_code == 404
        text = client.get("/metrics").get_data(as_text=True)
    assert series(text) == before
    assert not re.search(r"QZ\d{4}|no-such-page", text)
    counts = metric_samples(text, REQUESTS_METRIC)
    assert counts['{endpoint="other",method="other",status="405"}'] == 51.0  # no route matched: no rule either
    assert counts['{endpoint="other",method="other",status="404"}'] == 51.0
    assert counts['{endpoint="other",method="GET",status="404"}'] == 51.0


def test_made_up_methods_add_no_series_under_gunicorn(server: GunicornServer) -> None:
    def made_up(method: str) -> bytes:
        return raw_request(server.port, f"{method} /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())

    first = made_up("QZ0000")
    assert first.startswith(b"HTTP/1.1 405"), first[:200]  # gunicorn passes the method on; Flask refuses it
    requests.get(server.url("/metrics"), timeout=10)  # a scrape is counted after it answered
    before = series(requests.get(server.url("/metrics"), timeout=10).text)
    for method in MADE_UP_METHODS:
        assert made_up(method).startswith(b"HTTP/1.1 405")
    text = requests.get(server.url("/metrics"), timeout=10).text
    assert series(text) == before and "QZ00" not in text
    assert metric_samples(text, REQUESTS_METRIC)['{endpoint="other",method="other",status="405"}'] >= 51.0


# --- item 6: the API key fails closed and is read as written


@pytest.mark.parametrize("value", ["", "null", "None", "   ", "short-key", "x" * (API_KEY_MIN_LENGTH - 1)])
def test_a_set_but_unusable_api_key_stops_create_app(tiny_dir: Path, monkeypatch, value: str) -> None:
    monkeypatch.setenv("FLASK_MODEL_DIR", str(tiny_dir))
    monkeypatch.setenv("FLASK_DEFAULT_MODEL", "tiny")
    monkeypatch.setenv("FLASK_API_KEY", value)
    with pytest.raises(ConfigError, match="API_KEY") as raised:
        create_app()
    message = str(raised.value)
    if value.strip().lower() in ("", "null", "none"):
        assert "set but empty" in message
    else:
        assert "at least 16" in message and value not in message  # a secret is never quoted


@pytest.mark.parametrize("value", ["", 1234567890123456789, ["k"] * 20])
def test_a_set_but_unusable_api_key_in_the_test_config_stops_create_app(tiny_dir: Path, value) -> None:
    with pytest.raises(ConfigError, match="API_KEY"):
        create_app({"MODEL_DIR": str(tiny_dir), "DEFAULT_MODEL": "tiny", "API_KEY": value})


def test_the_api_key_is_the_raw_environment_string(tiny_dir: Path, monkeypatch) -> None:
    key = "1.000000000000000000"  # JSON would read the float 1.0: the key "1.0"
    monkeypatch.setenv("FLASK_MODEL_DIR", str(tiny_dir))
    monkeypatch.setenv("FLASK_DEFAULT_MODEL", "tiny")
    monkeypatch.setenv("FLASK_API_KEY", key)
    app = create_app()
    try:
        assert app.config["API_KEY"] == key
        client = app.test_client()

        def post(given: str) -> int:
            return client.post("/predict", data=png(), content_type="image/png",
                               headers={"Authorization": f"Bearer {given}"}).status_code  # fmt: skip

        assert post("1.0") == 401
        assert post(key) == 200
    finally:
        app.extensions["imgclf.models"].close()


def test_no_api_key_still_means_an_open_server(tiny_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("FLASK_API_KEY", raising=False)
    with closing_app({"MODEL_DIR": str(tiny_dir), "DEFAULT_MODEL": "tiny"}) as app:
        assert app.config["API_KEY"] is None
        assert app.test_client().post("/predict", data=png(), content_type="image/png").status_code == 200


def test_gunicorn_refuses_to_start_with_an_empty_or_null_api_key(tmp_path: Path, tiny_dir: Path) -> None:
    servers = {
        value or "empty": GunicornServer(tiny_dir, tmp_path / f"{value or 'empty'}.log",
                                         env={"FLASK_API_KEY": value, "FLASK_DEFAULT_MODEL": "tiny"})
        for value in ("", "null")
    }  # fmt: skip
    for log in logs_of_failed_starts(servers).values():
        assert "ConfigError: API_KEY is set but empty" in log, log[-3000:]
        assert "not starting: the settings or the models cannot be served" in log  # before any worker forks


# --- item 9: control characters escaped in every log line


def test_escape_control() -> None:
    assert escape_control("GET /\nfake-line\r\t\x1b[2J\x00\x7f\x85\u2028ok é 🐈") == (
        "GET /\\nfake-line\\r\\t\\x1b[2J\\x00\\x7f\\x85\\u2028ok é 🐈"
    )


def test_app_log_records_are_escaped_whatever_the_formatter() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(EscapeControl())
    log = logging.getLogger("test_envelope.escape")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("GET %s -> 404", "/\nfake-line")
        try:
            raise ValueError("bad name\nfake-line")
        except ValueError:
            log.exception("failed on %s", "x\nfake-line")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING GET /\\nfake-line -> 404"
    assert lines[1] == "ERROR failed on x\\nfake-line"
    assert all(line.startswith("    ") for line in lines[2:]) and len(lines) > 3  # the traceback, indented
    assert lines[-2:] == ["    ValueError: bad name", "    fake-line"]  # a traceback keeps its lines, indented
    assert not any(line.startswith("fake-line") for line in lines)


def test_gunicorn_logs_carry_no_forged_line(server: GunicornServer) -> None:
    answer = raw_request(server.port, b"GET /%0Afake-line HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404")
    for path in ("/%0Dfake-line", "/%1B%5B2Jfake-line", "/%E2%80%A8fake-line"):
        assert requests.get(server.url(path), timeout=10).status_code == 404
    upload = multipart(b"cat\nfake-line.png", png())
    r = requests.post(server.url("/predict"), timeout=30, **upload)
    assert r.status_code in (200, 400), r.text
    r = requests.post(server.url("/predict"), data=b"\n", headers={"Content-Type": "image/png"},
                      params={"model": "\nfake-line", "top_k": "\nfake-line"}, timeout=30)  # fmt: skip
    assert r.status_code in (400, 404)
    log = server.log()
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith("fake-line")], log[-3000:]
    assert "\x1b" not in log and "\u2028" not in log
    # the lines were written, escaped: gunicorn's access line and the app's own error line
    assert re.search(r'"GET /\\nfake-line HTTP/1.1" 404 ', log), log[-3000:]
    assert re.search(r"GET /\\nfake-line -> 404 not_found", log), log[-3000:]
    assert '"GET /\\x1b[2Jfake-line HTTP/1.1" 404' in log and "/\\u2028fake-line" in log


# --- the access log's atoms: computed lazily, the same values as gunicorn's own


def test_lazy_access_atoms_equal_gunicorn_safe_atoms() -> None:
    import datetime
    from types import SimpleNamespace

    from gunicorn import glogging
    from gunicorn.config import Config

    from serving.logs import EscapingLogger, LazyAtoms

    logger = EscapingLogger(Config())
    environ = {"REMOTE_ADDR": "10.0.0.7", "REQUEST_METHOD": "POST", "RAW_URI": "/predict?top_k=2",
               "PATH_INFO": "/predict", "QUERY_STRING": "top_k=2", "SERVER_PROTOCOL": "HTTP/1.1",
               "HTTP_USER_AGENT": 'curl/8 "quoted"', "HTTP_AUTHORIZATION": "Basic dXNlcjpwdw=="}  # fmt: skip
    req = SimpleNamespace(headers=[("USER-AGENT", 'curl/8 "quoted"'), ("X-Trace", "a"), ("X-Trace", "b")])
    resp = SimpleNamespace(status="200 OK", sent=1234, headers=[("Content-Type", "application/json"),
                                                                ("X-Request-ID", "r-42")])  # fmt: skip
    took = datetime.timedelta(seconds=1, microseconds=23456)
    theirs = glogging.SafeAtoms(glogging.Logger.atoms(logger, resp, req, environ, took))
    ours = logger.atoms(resp, req, environ, took)
    assert isinstance(ours, LazyAtoms)
    keys = [k for k in theirs if not k.startswith("{")] + ["{X-Request-ID}o", "{x-trace}i", "{user-agent}i",
            "{remote_addr}e", "{missing}i", "{missing}o", "nope"]  # fmt: skip
    for key in keys:
        if key == "t":  # the time of the call: the same format, maybe another second
            assert re.fullmatch(r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]", ours[key])
            continue
        assert ours[key] == theirs[key], key
    assert set(ours) >= {"h", "s", "b", "M"} and len(ours) > 0
    fmt = '%(h)s %(u)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s" id=%({x-request-id}o)s %(p)s'
    assert logging.LogRecord("a", 20, "", 0, fmt, (ours,), None).getMessage() == (
        f'10.0.0.7 user "POST /predict?top_k=2 HTTP/1.1" 200 1234 1023ms "curl/8 \\"quoted\\"" id=r-42 <{os.getpid()}>'
    )


def test_gunicorn_access_line(server: GunicornServer) -> None:
    upload = multipart(b"cat.png", png())
    upload["headers"] = {**upload["headers"], "User-Agent": "envelope-test/1"}
    r = requests.post(server.url("/predict"), timeout=30, **upload)
    assert r.status_code == 200, r.text
    rid = r.headers["X-Request-ID"]
    line = next(line for line in server.log().splitlines() if f"id={rid}" in line)
    pattern = rf'^127\.0\.0\.1 \[[^]]+\] "POST /predict HTTP/1\.1" 200 {len(r.content)} \d+ms "envelope-test/1" '
    pattern += rf"id={rid}$"
    assert re.match(pattern, line), line
