"""The production envelope's small guarantees: bounded metric labels, an API key that fails closed, and log
lines a client cannot forge. Each is checked through the Flask app and against real gunicorn."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import requests
from conftest import closing_app, tiny_bundle
from helpers import GunicornServer, image_bytes, metric_samples
from PIL import Image

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
