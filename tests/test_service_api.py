"""The Flask app through its test client: every endpoint and every error, with the real default model."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from flask import request
from openapi_spec_validator import validate
from PIL import Image

from app import create_app
from serving.config import ConfigError
from serving.registry import ModelLoadError
from tests.support.bundles import tiny_bundle
from tests.support.images import image_bytes, png_header_only, tiff_with_broken_second_page
from tests.support.photos import CAT_LABELS, top_label
from tests.support.service import closing_app, metric_samples

TINY_CLASSES = ["red square", "green circle", "blue star"]


@pytest.fixture(scope="module")
def model_dir(make_model_folder) -> Path:
    folder = make_model_folder("served")
    tiny_bundle(folder / "tiny.pth", TINY_CLASSES)
    return folder


@pytest.fixture(scope="module")
def app(model_dir: Path):
    with closing_app({"MODEL_DIR": str(model_dir)}) as app:
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-only")
    tiny_bundle(folder / "tiny.pth", TINY_CLASSES)
    return folder


def tiny_app(tiny_dir: Path, **config):
    return create_app({"MODEL_DIR": str(tiny_dir), "DEFAULT_MODEL": "tiny", **config})


def post_file(client, data: bytes, filename: str = "x.png", content_type: str | None = None, **params):
    form = {"file": (io.BytesIO(data), filename, content_type) if content_type else (io.BytesIO(data), filename)}
    form.update(params)
    return client.post("/predict", data=form, content_type="multipart/form-data")


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- predict: the happy paths


def test_predict_chelsea_is_a_cat(client, photos) -> None:
    r = post_file(client, photos["chelsea"].read_bytes(), "chelsea.png")
    assert r.status_code == 200
    body = r.get_json()
    assert body["model"] == "default"
    assert top_label(body) in CAT_LABELS
    preds = body["predictions"]
    assert len(preds) == 3
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    assert all(0 <= p["score"] <= 1 and isinstance(p["index"], int) for p in preds)
    assert body["time_ms"] > 0


def test_bytes_decide_not_the_declared_type(client, photos) -> None:
    png = photos["chelsea"].read_bytes()
    r = post_file(client, png, "cat.jpg", content_type="image/jpeg")
    assert r.status_code == 200 and top_label(r.get_json()) in CAT_LABELS
    raw = client.post("/predict", data=png, content_type="image/jpeg")
    assert raw.status_code == 200 and top_label(raw.get_json()) in CAT_LABELS
    assert raw.get_json()["predictions"] == r.get_json()["predictions"]


def test_top_k_from_query_and_form(client, photos) -> None:
    data = photos["coffee"].read_bytes()
    assert len(post_file(client, data, top_k="1").get_json()["predictions"]) == 1
    r = client.post("/predict?top_k=7", data=data, content_type="image/png")
    assert len(r.get_json()["predictions"]) == 7


def test_second_model_by_query_or_form(client, photos) -> None:
    data = photos["chelsea"].read_bytes()
    by_form = post_file(client, data, model="tiny", top_k="5").get_json()
    assert by_form["model"] == "tiny"
    # three classes only, whatever top_k asks
    assert sorted(p["label"] for p in by_form["predictions"]) == sorted(TINY_CLASSES)
    by_query = client.post("/predict?model=tiny", data=data, content_type="image/png").get_json()
    assert by_query["model"] == "tiny" and by_query["predictions"][0] == by_form["predictions"][0]


def test_several_files_answered_in_order_with_per_file_errors(client, photos) -> None:
    chelsea, coffee = photos["chelsea"].read_bytes(), photos["coffee"].read_bytes()
    form = {
        "file": [
            (io.BytesIO(chelsea), "chelsea.png"),
            (io.BytesIO(b"not an image at all"), "notes.txt"),
            (io.BytesIO(coffee), "coffee.png"),
        ]
    }
    r = client.post("/predict", data=form, content_type="multipart/form-data")
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert [x["filename"] for x in results] == ["chelsea.png", "notes.txt", "coffee.png"]
    assert results[1]["error"]["code"] == "not_an_image" and results[1]["status"] == 415
    assert results[0]["predictions"] == post_file(client, chelsea).get_json()["predictions"]
    assert results[2]["predictions"] == post_file(client, coffee).get_json()["predictions"]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda im: image_bytes(im.convert("P"), "PNG"), id="P"),
        pytest.param(lambda im: image_bytes(im.convert("LA"), "PNG"), id="LA"),
        pytest.param(lambda im: image_bytes(im.convert("RGBA"), "WEBP"), id="RGBA-webp"),
        pytest.param(lambda im: image_bytes(im.convert("CMYK"), "JPEG"), id="CMYK-jpeg"),
        pytest.param(lambda im: image_bytes(im.convert("L").convert("I;16"), "PNG"), id="I;16"),
        pytest.param(lambda im: image_bytes(im.convert("1"), "PNG"), id="1-bit"),
        pytest.param(lambda im: image_bytes(im, "BMP"), id="BMP"),
        pytest.param(lambda im: image_bytes(im, "TIFF"), id="TIFF"),
        pytest.param(
            lambda im: image_bytes(im, "GIF", save_all=True, append_images=[im.rotate(90)], duration=100),
            id="animated-GIF",
        ),
    ],
)
def test_every_accepted_format_and_mode(tiny_dir, photos, make) -> None:
    app = tiny_app(tiny_dir)
    photo = Image.open(photos["astronaut"]).convert("RGB").resize((96, 96))
    r = post_file(app.test_client(), make(photo))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["predictions"][0]["label"] in TINY_CLASSES


# --- errors


def test_no_file(client) -> None:
    assert_error(client.post("/predict"), 400, "no_file")
    r = client.post("/predict", data={"image": (io.BytesIO(b"x"), "a.png")}, content_type="multipart/form-data")
    assert "image" in assert_error(r, 400, "no_file")["message"]


def test_empty_file(client) -> None:
    assert_error(post_file(client, b""), 400, "empty_file")


def test_wrong_content_type(client) -> None:
    assert_error(client.post("/predict", json={"url": "http://x"}), 415, "unsupported_media_type")


@pytest.mark.parametrize("value", ["0", "-1", "abc", "21", "1.5"])
def test_bad_top_k(client, photos, value: str) -> None:
    assert_error(post_file(client, photos["coffee"].read_bytes(), top_k=value), 400, "bad_top_k")


def test_not_an_image_and_unsupported_format(client, photos) -> None:
    assert_error(post_file(client, b"%PDF-1.4 hello"), 415, "not_an_image")
    ppm = image_bytes(Image.open(photos["coffee"]).convert("RGB"), "PPM")
    assert_error(post_file(client, ppm, "x.ppm"), 415, "unsupported_format")


def test_truncated_images(client, photos) -> None:
    jpeg = image_bytes(Image.open(photos["chelsea"]).convert("RGB"), "JPEG")
    assert_error(post_file(client, jpeg[: len(jpeg) // 2], "cut.jpg"), 422, "corrupt_image")
    png = photos["coffee"].read_bytes()
    assert_error(post_file(client, png[: len(png) // 2], "cut.png"), 422, "corrupt_image")


def test_broken_later_tiff_page_is_never_read(client) -> None:
    # Pillow raised TypeError on this second page (a 500, then a 422 once caught) while counting the pages;
    # only the first page is read now (issue 15: no page walk), so the file is answered from that page
    r = post_file(client, tiff_with_broken_second_page(), "pages.tif")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert len(r.get_json()["predictions"]) == 3


def test_too_many_pixels(client) -> None:
    # over the configured 40 MP, and over Pillow's own bomb limit: refused from the header
    assert_error(post_file(client, png_header_only(8000, 6000)), 413, "too_many_pixels")
    assert_error(post_file(client, png_header_only(30000, 30000)), 413, "too_many_pixels")


def test_body_too_large(client) -> None:
    r = client.post("/predict", data=b"\0" * (10 * 1024 * 1024 + 1), content_type="image/png")
    assert_error(r, 413, "payload_too_large")


def test_too_many_files(client) -> None:
    form = {"file": [(io.BytesIO(b"x"), f"{i}.png") for i in range(17)]}
    assert_error(client.post("/predict", data=form, content_type="multipart/form-data"), 400, "too_many_files")


def test_unknown_model_is_404_and_never_a_path(client, photos) -> None:
    data = photos["coffee"].read_bytes()
    for name in ("nope", "../default", "default.pth", "/etc/passwd"):
        assert_error(post_file(client, data, model=name), 404, "model_not_found")


def test_wrong_method_and_unknown_path(client) -> None:
    r = client.get("/predict")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]
    assert_error(client.post("/healthz"), 405, "method_not_allowed")
    assert_error(client.get("/no/such/thing"), 404, "not_found")


def test_unexpected_error_is_500_with_request_id_and_no_traceback(tiny_dir, caplog) -> None:
    app = tiny_app(tiny_dir)

    @app.get("/explode")
    def explode():
        return {"value": 1 / 0}

    with caplog.at_level(logging.ERROR):
        r = app.test_client().get("/explode")
    error = assert_error(r, 500, "internal_error")
    assert error["request_id"] == r.headers["X-Request-ID"]
    assert error["request_id"] in error["message"]
    assert "Traceback" not in r.get_data(as_text=True) and "ZeroDivisionError" not in r.get_data(as_text=True)
    assert "ZeroDivisionError" in caplog.text and error["request_id"] in caplog.text


def test_api_key(tiny_dir, photos) -> None:
    client = tiny_app(tiny_dir, API_KEY="s3cret-key-0123456789").test_client()
    data = photos["coffee"].read_bytes()
    r = client.post("/predict", data=data, content_type="image/png")
    assert_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.post("/predict", data=data, content_type="image/png", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "unauthorized")
    basic = client.post("/predict", data=data, content_type="image/png", headers={"Authorization": "Basic czNjcmV0"})
    assert_error(basic, 401, "unauthorized")
    ok = client.post(
        "/predict", data=data, content_type="image/png", headers={"Authorization": "Bearer s3cret-key-0123456789"}
    )
    assert ok.status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/models", "/openapi.json"):
        assert client.get(path).status_code == 200, path


# --- the other endpoints


def test_health_and_readiness(tiny_dir, photos) -> None:
    app = tiny_app(tiny_dir)
    client = app.test_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["models"] == ["tiny"]
    app.extensions["imgclf.models"].close()  # what gunicorn's worker_exit does
    assert_error(client.get("/readyz"), 503, "not_ready")
    assert_error(
        client.post("/predict", data=photos["coffee"].read_bytes(), content_type="image/png"), 503, "not_ready"
    )
    assert client.get("/healthz").status_code == 200


def test_models_lists_every_bundle(client) -> None:
    body = client.get("/models").get_json()
    assert body["default_model"] == "default"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"default", "tiny"}
    assert by_name["default"]["arch"] == "efficientnet_lite0" and by_name["default"]["num_classes"] == 1000
    assert "tabby" in by_name["default"]["class_names"]
    assert by_name["tiny"]["class_names"] == TINY_CLASSES
    assert by_name["tiny"]["preprocessing"]["crop"] == 32
    assert by_name["tiny"]["metrics"] == {"note": "random weights for tests"}


def test_metrics(client, photos) -> None:
    post_file(client, photos["coffee"].read_bytes())
    post_file(client, b"")
    text = client.get("/metrics").get_data(as_text=True)
    requests_total = metric_samples(text, "imgclf_http_requests_total")
    assert requests_total['{endpoint="/predict",method="POST",status="200"}'] >= 1
    assert requests_total['{endpoint="/predict",method="POST",status="400"}'] >= 1
    assert metric_samples(text, "imgclf_http_request_duration_seconds_count")
    assert metric_samples(text, "imgclf_inference_batch_size_count")['{model="default"}'] >= 1
    loads = metric_samples(text, "imgclf_model_load_seconds")
    assert set(loads) == {'{model="default"}', '{model="tiny"}'} and all(v > 0 for v in loads.values())


def test_openapi_document_is_valid_and_complete(app, client) -> None:
    doc = client.get("/openapi.json").get_json()
    validate(doc)
    routes = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert routes <= set(doc["paths"])
    assert doc["paths"]["/predict"]["post"]["parameters"][0]["schema"]["enum"] == ["default", "tiny"]


def test_security_headers_on_answers_and_errors(client) -> None:
    for r in (client.get("/healthz"), client.get("/nope"), post_file(client, b"")):
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert len(r.headers["X-Request-ID"]) == 32


def test_uploads_stay_in_memory(app, photos) -> None:
    big = image_bytes(Image.open(photos["astronaut"]), "BMP")  # ~800 KB: Werkzeug would spool it to disk
    assert len(big) > 500_000
    body = io.BytesIO()
    with app.test_request_context("/predict", method="POST", data={"file": (io.BytesIO(big), "a.bmp")}):
        stream = request.files["file"].stream
        assert isinstance(stream, io.BytesIO)
        body.write(stream.getvalue())
    assert body.getvalue() == big


# --- settings


def test_settings_from_the_environment(tiny_dir, photos, monkeypatch) -> None:
    monkeypatch.setenv("FLASK_MODEL_DIR", str(tiny_dir))
    monkeypatch.setenv("FLASK_DEFAULT_MODEL", "tiny")
    monkeypatch.setenv("FLASK_TOP_K_DEFAULT", "2")
    monkeypatch.setenv("FLASK_API_KEY", "1234567890123456")  # JSON would make it a number: read as written
    app = create_app()
    r = app.test_client().post(
        "/predict",
        data=photos["coffee"].read_bytes(),
        content_type="image/png",
        headers={"Authorization": "Bearer 1234567890123456"},
    )
    assert r.status_code == 200 and len(r.get_json()["predictions"]) == 2


@pytest.mark.parametrize(
    "config,message",
    [
        ({"BATCH_MAX_SIZE": -1}, "BATCH_MAX_SIZE"),
        ({"TOP_K_DEFAULT": 5, "TOP_K_MAX": 2}, "TOP_K_DEFAULT"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"MAX_FILES": "many"}, "MAX_FILES"),
    ],
)
def test_bad_settings_refuse_to_start(tiny_dir, config, message) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_app(tiny_dir, **config)


def test_bad_bundle_refuses_to_start(tmp_path) -> None:
    tiny_bundle(tmp_path / "good.pth", TINY_CLASSES)
    (tmp_path / "broken.pth").write_bytes(b"this is not a torch file")
    with pytest.raises(ModelLoadError, match="broken.pth"):
        create_app({"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "good"})


def test_missing_default_model(tmp_path) -> None:
    tiny_bundle(tmp_path / "good.pth", TINY_CLASSES)
    with pytest.raises(ModelLoadError, match="'other' is not in"):
        create_app({"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "other"})


def test_built_in_default_is_built_when_missing(tmp_path, photos) -> None:
    app = create_app({"MODEL_DIR": str(tmp_path / "models")})
    assert (tmp_path / "models" / "default.pth").is_file()
    r = app.test_client().post("/predict", data=photos["chelsea"].read_bytes(), content_type="image/png")
    assert top_label(r.get_json()) in CAT_LABELS


def test_read_only_folder_without_default_fails_with_guidance(tmp_path, monkeypatch) -> None:
    # A read-only mount cannot be made for root here: the file system's refusal is simulated.
    tiny_bundle(tmp_path / "mine.pth", TINY_CLASSES)

    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr("serving.prepare.ensure_default_model", read_only)
    with pytest.raises(ModelLoadError, match="has no default.pth and it cannot be built there.*FLASK_DEFAULT_MODEL"):
        create_app({"MODEL_DIR": str(tmp_path)})
