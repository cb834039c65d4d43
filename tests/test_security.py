"""In-process security checks: the API key comparison, no tracebacks even in debug mode, one place for
security headers, and the aspect-ratio cut that keeps odd images cheap without changing what the model sees."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import numpy as np
import pytest
from flask import Response
from PIL import Image
from torchvision.transforms import v2

from app import create_app
from model.pixels import LimitAspectRatio, prepare
from model.preprocessing import Preprocessing
from serving import api
from serving.http import content_security_policy
from tests.support.bundles import tiny_bundle


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("security-models")
    tiny_bundle(folder / "tiny.pth", ["a", "b", "c"])
    return folder


def make_app(tiny_dir: Path, **config):
    return create_app({"MODEL_DIR": str(tiny_dir), "DEFAULT_MODEL": "tiny", **config})


def png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "green").save(buf, "PNG")
    return buf.getvalue()


def test_api_key_goes_through_compare_digest(tiny_dir: Path, monkeypatch) -> None:
    seen = []
    real = hmac.compare_digest

    def recording(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.hmac, "compare_digest", recording)  # a spy: the real comparison still decides
    client = make_app(tiny_dir, API_KEY="k" * 40).test_client()
    wrong = client.post("/predict", data=png(), headers={"Authorization": "Bearer " + "x" * 40,
                                                        "Content-Type": "image/png"})  # fmt: skip
    right = client.post("/predict", data=png(), headers={"Authorization": "Bearer " + "k" * 40,
                                                        "Content-Type": "image/png"})  # fmt: skip
    assert wrong.status_code == 401 and right.status_code == 200
    assert seen == [(b"x" * 40, b"k" * 40), (b"k" * 40, b"k" * 40)]


def test_no_traceback_in_answers_even_in_debug_mode(tiny_dir: Path, caplog) -> None:
    app = make_app(tiny_dir, DEBUG=True)

    @app.get("/boom")  # a route that fails the way a bug would
    def boom() -> Response:
        raise RuntimeError("secret internal detail")

    with caplog.at_level(logging.ERROR):
        r = app.test_client().get("/boom")
    assert r.status_code == 500 and r.json["error"]["code"] == "internal_error"
    text = r.get_data(as_text=True)
    assert "Traceback" not in text and "secret internal detail" not in text and "RuntimeError" not in text
    assert r.json["error"]["request_id"] == r.headers["X-Request-ID"]
    assert "secret internal detail" in caplog.text  # the traceback is in the log
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


def test_a_view_may_set_its_own_csp_but_never_allow_framing(tiny_dir: Path) -> None:
    app = make_app(tiny_dir)

    @app.get("/page")
    def page() -> Response:
        return Response("<p>hi</p>", headers={"Content-Security-Policy": content_security_policy(
            default_src="'self'", frame_ancestors="*")})  # fmt: skip

    @app.get("/careless")
    def careless() -> Response:
        return Response("<p>hi</p>", headers={"Content-Security-Policy": "default-src 'self'"})

    client = app.test_client()
    page_csp = client.get("/page").headers["Content-Security-Policy"]
    assert "default-src 'self'" in page_csp and "frame-ancestors 'none'" in page_csp and "*" not in page_csp
    assert client.get("/careless").headers["Content-Security-Policy"] == "default-src 'self'; frame-ancestors 'none'"
    api_csp = client.get("/healthz").headers["Content-Security-Policy"]
    assert api_csp == content_security_policy() and "default-src 'none'" in api_csp


def test_aspect_ratio_cut_keeps_what_the_model_sees(photos) -> None:
    prep = Preprocessing(resize=256, crop=224, mean=[0.5] * 3, std=[0.5] * 3, interpolation="bilinear", channels=3)
    uncut = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])  # torchvision on the whole image
    photo = Image.open(photos["china"]).convert("RGB")  # 640x427
    strip = photo.crop((0, 200, 640, 210))  # 640x10: 64:1, cut to 160x10
    assert LimitAspectRatio()(strip).size == (160, 10)
    assert LimitAspectRatio()(photo) is photo  # ordinary photos untouched

    def levels(img: Image.Image) -> np.ndarray:
        return np.asarray(img, dtype=np.float64).transpose(2, 0, 1)

    assert np.abs(prepare(strip, prep) - levels(uncut(strip))).mean() < 1.3  # grey levels
    assert np.abs(prepare(photo, prep) - levels(uncut(photo))).max() <= 1
