"""The real thing: gunicorn with gunicorn.conf.py on 127.0.0.1, two workers, two models in the folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from serving.launcher import GunicornServer
from tests.support.bundles import tiny_bundle
from tests.support.photos import CAT_LABELS, top_label
from tests.support.service import metric_samples

TINY_CLASSES = ["cirrus", "cumulus", "nimbus"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, make_model_folder):
    folder = make_model_folder("gunicorn-models")
    tiny_bundle(folder / "clouds.pth", TINY_CLASSES)
    # as many admission slots as request threads: 12 clients here must all be answered, never shed
    # (tests/test_admission.py is about shedding)
    srv = GunicornServer(
        folder, tmp_path_factory.mktemp("logs") / "gunicorn.log", workers=2, threads=4, env={"FLASK_MAX_INFLIGHT": "4"}
    )
    srv.start()
    yield srv
    srv.stop()


def test_requests_multipart_chelsea(server, photos) -> None:
    with open(photos["chelsea"], "rb") as f:
        r = requests.post(server.url("/predict"), files={"file": ("chelsea.png", f, "image/png")}, timeout=30)
    assert r.status_code == 200
    assert r.json()["model"] == "default" and top_label(r.json()) in CAT_LABELS
    assert r.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_multipart_and_raw_body(server, photos) -> None:
    form = subprocess.run(
        ["curl", "-sS", "-F", f"file=@{photos['chelsea']}", server.url("/predict")],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert top_label(json.loads(form.stdout)) in CAT_LABELS
    raw = subprocess.run(
        ["curl", "-sS", "--data-binary", f"@{photos['chelsea']}", "-H", "Content-Type: image/jpeg",
         server.url("/predict?top_k=1")],
        capture_output=True,
        check=True,
        timeout=30,
    )  # fmt: skip
    body = json.loads(raw.stdout)
    assert len(body["predictions"]) == 1 and top_label(body) in CAT_LABELS


def test_second_model_is_routed(server, photos) -> None:
    with open(photos["coffee"], "rb") as f:
        r = requests.post(server.url("/predict"), files={"file": f}, data={"model": "clouds", "top_k": "3"}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "clouds"
    assert sorted(p["label"] for p in r.json()["predictions"]) == sorted(TINY_CLASSES)
    models = requests.get(server.url("/models"), timeout=10).json()
    assert {m["name"] for m in models["models"]} == {"default", "clouds"}
    missing = requests.post(server.url("/predict?model=nope"), data=b"x", headers={"Content-Type": "image/png"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_concurrent_load_answers_like_sequential_and_metrics_add_up(server, photos) -> None:
    names = ["chelsea", "coffee", "china", "flower", "astronaut"]
    payloads = {name: photos[name].read_bytes() for name in names}

    def ask(name: str) -> tuple[str, list[dict]]:
        r = requests.post(server.url("/predict"), files={"file": (name, payloads[name])}, timeout=60)
        assert r.status_code == 200, r.text
        return name, r.json()["predictions"]

    expected = dict(ask(name) for name in names)
    before = metric_samples(requests.get(server.url("/metrics"), timeout=10).text, "imgclf_http_requests_total")
    jobs = names * 6  # 30 requests from 12 clients, across both workers
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, jobs))
    for name, preds in answers:
        assert [p["label"] for p in preds] == [p["label"] for p in expected[name]]
        assert [p["score"] for p in preds] == pytest.approx([p["score"] for p in expected[name]], abs=1e-4)
    assert top_label({"predictions": expected["chelsea"]}) in CAT_LABELS
    text = requests.get(server.url("/metrics"), timeout=10).text
    after = metric_samples(text, "imgclf_http_requests_total")
    key = '{endpoint="/predict",method="POST",status="200"}'
    assert after[key] - before.get(key, 0) == len(jobs)  # whichever worker answered the scrape
    assert metric_samples(text, "imgclf_model_load_seconds")['{model="default"}'] > 0


def test_body_too_large_while_streaming_and_declared(server) -> None:
    def chunks():
        for _ in range(200):  # 13 MB, chunked: no Content-Length to check up front
            yield b"\xff" * 65536

    streamed = requests.post(server.url("/predict"), data=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
    declared = requests.post(server.url("/predict"), files={"file": ("big.jpg", b"\xff" * (11 << 20))}, timeout=60)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "payload_too_large"


def test_bad_input_does_not_kill_workers(server, photos) -> None:
    data = photos["coffee"].read_bytes()
    for junk in (b"", b"GIF89a", data[:1000], os.urandom(5000)):
        r = requests.post(server.url("/predict"), files={"file": ("x", junk)}, timeout=30)
        assert r.status_code in (400, 415, 422), r.text
    assert requests.get(server.url("/readyz"), timeout=10).status_code == 200
    assert "Worker exiting" not in server.log() and "Traceback" not in server.log()


def test_openapi_and_health(server) -> None:
    assert requests.get(server.url("/healthz"), timeout=10).json() == {"status": "ok"}
    doc = requests.get(server.url("/openapi.json"), timeout=10).json()
    assert doc["openapi"].startswith("3.")


def test_graceful_stop_cleans_up(server) -> None:
    line = next(line for line in server.log().splitlines() if "Prometheus multiprocess folder" in line)
    metrics_dir = Path(line.rpartition(": ")[2].strip())
    assert list(metrics_dir.glob("*.db"))  # the workers wrote their samples there
    assert server.stop() == 0
    log = server.log()
    assert "Traceback" not in log and "Shutting down: Master" in log
    assert not metrics_dir.exists()


def test_broken_bundle_refuses_to_start(tmp_path, default_bundle) -> None:
    (tmp_path / "default.pth").symlink_to(default_bundle)
    (tmp_path / "half.pth").write_bytes(default_bundle.read_bytes()[:100_000])
    srv = GunicornServer(tmp_path, tmp_path / "gunicorn.log", workers=1)
    with pytest.raises(RuntimeError, match="half.pth"):
        srv.start(timeout=60)
    assert srv.proc is not None and srv.proc.returncode != 0
