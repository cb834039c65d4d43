"""Explanations: Grad-CAM (model/explain.py) on real architectures and real photos, the gallery of a real
Fashion-MNIST model's mistakes (training.evaluate --mistakes) and POST /explain (serving/explain.py)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import create_app
from model.bundle import load_bundle, make_bundle, save_bundle
from model.explain import ExplanationUnsupported, GradCam, input_image, overlay, png_bytes, target_layer
from model.pixels import prepare
from model.predictor import softmax
from model.preprocessing import Preprocessing
from model.registry import IMAGENET_MEAN, IMAGENET_STD, build_model
from model.torch_predictor import TorchPredictor
from serving.admission import EXTENSION as ADMISSION
from serving.config import ConfigError
from serving.explain import EXTENSION as EXPLAINERS
from tests.support.bundles import tiny_bundle
from tests.support.images import image_bytes, png_header_only
from tests.support.photos import CAT_LABELS
from tests.support.service import closing_app, metric_samples
from tests.test_pixels import onnx_worker_manifest, run_as_worker
from training import evaluate, prepare_fashion_mnist, recipes, train

SMALL = Preprocessing(resize=64, crop=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def photo_pixels(path: Path, prep: Preprocessing) -> np.ndarray:
    """A real photo through the eval preprocessing, as a batch of one."""
    return prepare(Image.open(path), prep)[np.newaxis]


# --- Grad-CAM on the registry's architectures


@pytest.mark.parametrize(
    ("arch", "layer"),
    [
        ("simple_cnn", "features"),
        ("efficientnet_lite0", "_bn1"),
        ("resnet18", "layer4"),
        ("densenet121", "features"),
        ("mobilenet_v3_small", "features"),
        ("efficientnet_b0", "features"),
        ("convnext_tiny", "features"),
        ("regnet_y_400mf", "trunk_output"),
        ("shufflenet_v2_x0_5", "conv5"),
        ("mnasnet0_5", "layers"),
    ],
)
def test_every_convolutional_family_gets_its_last_feature_map(arch: str, layer: str, photos) -> None:
    torch.manual_seed(0)
    network = build_model(arch, num_classes=4, pretrained="none").eval()
    cam = GradCam(network, SMALL)
    assert cam.layer == layer
    [explained] = cam.explain(photo_pixels(photos["coffee"], SMALL))
    heat = explained.heatmap
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)  # scaled to its peak
    assert heat.std() > 0.01, "a constant map"
    assert explained.target == int(explained.logits.argmax())  # the top class by default


@pytest.mark.parametrize(("arch", "kwargs"), [("vit_b_16", {"image_size": 32}), ("swin_t", {})])
def test_transformers_are_refused_with_a_clear_reason(arch: str, kwargs: dict) -> None:
    network = build_model(arch, num_classes=3, pretrained="none", **kwargs)
    with pytest.raises(ExplanationUnsupported, match="transformer .*attention.*convolutional feature map"):
        target_layer(network, (3, 32, 32))


def quadrants(heat: np.ndarray) -> list[float]:
    """Mean heat of the top-left, top-right, bottom-left and bottom-right quarters."""
    n = heat.shape[0] // 2
    return [
        float(heat[:n, :n].mean()),
        float(heat[:n, n:].mean()),
        float(heat[n:, :n].mean()),
        float(heat[n:, n:].mean()),
    ]


def square(path: Path, side: int) -> Image.Image:
    img = Image.open(path).convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((side, side), Image.Resampling.BICUBIC)


def test_the_default_model_looks_at_the_cat_for_cat_and_at_the_cup_for_espresso(default_bundle, photos) -> None:
    """The cat in the top-left quarter, the espresso in the bottom-right, grey elsewhere: each class's heat
    lies on its own photo."""
    bundle, network = load_bundle(default_bundle)
    cam = GradCam(network, bundle.preprocessing)
    canvas = Image.new("RGB", (448, 448), (128, 128, 128))
    canvas.paste(square(photos["chelsea"], 224), (0, 0))
    canvas.paste(square(photos["coffee"], 224), (224, 224))
    pixels = prepare(canvas, bundle.preprocessing)[np.newaxis]
    names = list(bundle.class_names)
    [top] = cam.explain(pixels)
    probs = softmax(top.logits[None], bundle.temperature)[0]
    cat = max((names.index(label) for label in CAT_LABELS), key=lambda i: probs[i])
    espresso = names.index("espresso")
    [for_cat, for_espresso] = cam.explain(np.concatenate([pixels, pixels]), [cat, espresso])
    q = quadrants(for_cat.heatmap)
    assert q[0] > 3 * max(q[1:]), q
    q = quadrants(for_espresso.heatmap)
    assert q[3] > 3 * max(q[:3]), q


@pytest.mark.parametrize(("name", "labels"), [("chelsea", CAT_LABELS), ("coffee", {"espresso"})])
def test_the_default_model_on_real_photos(default_bundle, photos, name: str, labels: set[str]) -> None:
    bundle, network = load_bundle(default_bundle)
    cam = GradCam.from_bundle(bundle)
    assert cam.layer == "_bn1"
    pixels = photo_pixels(photos[name], bundle.preprocessing)
    [explained] = cam.explain(pixels)
    assert bundle.class_names[explained.target] in labels
    heat = explained.heatmap
    assert heat.shape == (224, 224) and 0 <= heat.min() and heat.max() == pytest.approx(1.0)
    assert heat.std() > 0.05
    # the same probabilities as the served torch predictor
    probs = softmax(explained.logits[None], bundle.temperature)
    served = TorchPredictor(bundle, network, device="cpu", warmup=False).infer(pixels)
    np.testing.assert_allclose(probs, served, atol=1e-5)


def test_mirrored_evaluation_gives_a_mirrored_heat_map(photos) -> None:
    """SimpleCNN's tta_hflip scores an image and its mirror: its heat map of a mirrored photo is the mirror
    of the photo's map. Without tta_hflip the network has no such symmetry (the check can fail)."""
    prep = Preprocessing(resize=48, crop=48, mean=(0.5,) * 3, std=(0.25,) * 3)
    pixels = photo_pixels(photos["astronaut"], prep)
    mirrored = np.ascontiguousarray(pixels[..., ::-1])
    gaps = {}
    for tta in (True, False):
        torch.manual_seed(0)
        cam = GradCam(build_model("simple_cnn", 3, width=8, stages=2, tta_hflip=tta), prep)
        [a, b] = cam.explain(np.concatenate([pixels, mirrored]), [1, 1])
        gaps[tta] = float(np.abs(a.heatmap - b.heatmap[:, ::-1]).max())
    assert gaps[True] < 1e-4 < 0.05 < gaps[False], gaps


def test_overlay_colours_the_hot_part_and_keeps_the_photo() -> None:
    grey = np.full((1, 28, 28), 128, dtype=np.uint8)
    heat = np.zeros((28, 28), dtype=np.float32)
    heat[:, 14:] = 1.0
    img = overlay(grey, heat, scale=5)
    assert img.mode == "RGB" and img.size == (140, 140)
    arr = np.asarray(img).astype(int)
    cold, hot = arr[70, 10], arr[70, 130]
    assert cold[2] > cold[0] and hot[0] > hot[2]  # blue where nothing, red where most
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(img)))), np.asarray(img))
    plain = np.asarray(input_image(grey, scale=5))
    assert plain.shape == (140, 140, 3) and (plain == 128).all()
    with pytest.raises(ValueError, match="do not match"):
        overlay(grey, heat[:10])


# --- training.evaluate --mistakes


FAST = ["--epochs", "1", "--batch-size", "16", "--quiet", "--workers", "0", "--seed", "1"]


def test_evaluate_writes_the_most_confident_mistakes_with_heat_maps(fashion_subset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train.main(recipes.parse_args(train.get_args_parser(), ["--data", str(fashion_subset), "--out", str(run), *FAST]))
    report = tmp_path / "report"
    argv = ["--bundle", str(run / "best.pth"), "--data", str(fashion_subset), "--out", str(report), "--mistakes", "6"]
    metrics = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    gallery = report / "mistakes"
    assert metrics["mistakes"] == {"shown": 6, "gallery": str(gallery / "index.html")}

    # the six most confident mistakes, found here with the served predictor on every test image
    predictor = TorchPredictor.from_file(run / "best.pth", device="cpu", warmup=False)
    files = sorted((fashion_subset / "test").glob("*/*.png"))
    answers = [predictor.predict([Image.open(f)], top_k=1)[0][0] for f in files]
    wrong = [(a["score"], str(f), a["label"], f.parent.name) for f, a in zip(files, answers, strict=True)
             if a["label"] != f.parent.name]  # fmt: skip
    assert len(wrong) > 6
    expected = sorted(wrong, key=lambda w: -w[0])[:6]
    page = (gallery / "index.html").read_text()
    cards = re.findall(r"<article><h3>#(\d+): said <b>([^<]+)</b> \(([\d.]+) %\), is <b>([^<]+)</b>", page)
    assert [int(c[0]) for c in cards] == [1, 2, 3, 4, 5, 6]
    for (score, _, said, truth), (_, shown_said, percent, shown_truth) in zip(expected, cards, strict=True):
        assert (html.unescape(shown_said), html.unescape(shown_truth)) == (said, truth)
        assert float(percent) == pytest.approx(100 * score, abs=0.051)
    articles = page.split("<article>")[1:]
    for rank in range(1, 7):
        pngs = [Image.open(gallery / f"{rank:04d}-{kind}.png") for kind in ("photo", "predicted", "true")]
        assert all(p.size == (140, 140) for p in pngs)  # 28 px, enlarged 5 times
        photo, said_map, true_map = (np.asarray(p.convert("RGB")).astype(int) for p in pngs)
        assert np.abs(said_map - photo).mean() > 5 and np.abs(true_map - photo).mean() > 5
        # a map with no heat at all (nothing raised that class's score) is said so under it
        grey = photo[::5, ::5, 0].astype(np.uint8)[np.newaxis]
        cold = np.asarray(overlay(grey, np.zeros((28, 28), dtype=np.float32), scale=5)).astype(int)
        captions = re.findall(r"<figcaption>(.*?)</figcaption>", articles[rank - 1])[1:]
        for heat_map, caption in zip((said_map, true_map), captions, strict=True):
            assert caption.startswith("nothing here raised") == np.array_equal(heat_map, cold), caption
    assert len(re.findall(r'<img src="\d{4}-(?:photo|predicted|true)\.png" alt="[^"]+">', page)) == 18
    assert "Grad-CAM on layer features" in page

    # per-class accuracy: the confusion matrix's diagonal over its rows, in metrics.json and on the page
    confusion = json.loads((report / "confusion.json").read_text())
    accuracy = json.loads((report / "metrics.json").read_text())["per_class_accuracy"]
    assert sorted(confusion["class_names"]) == sorted(prepare_fashion_mnist.CLASS_NAMES) == sorted(accuracy)
    for i, name in enumerate(confusion["class_names"]):
        row = confusion["matrix"][i]
        assert accuracy[name] == {"images": 20, "correct": row[i], "accuracy": round(row[i] / sum(row), 6)}
        assert f"<tr><td>{html.escape(name)}</td><td>20</td><td>{row[i]}</td>" in page
    assert sum(a["correct"] for a in accuracy.values()) == round(metrics["top1"] * 200)

    with pytest.raises(SystemExit, match="--mistakes"):
        evaluate.main(evaluate.get_args_parser().parse_args([*argv[:-1], "-1"]))


# --- POST /explain


@pytest.fixture(scope="module")
def model_dir(make_model_folder) -> Path:
    folder = make_model_folder("explained")
    tiny_bundle(folder / "tiny.pth", ["sunflower", "daisy", "tulip"])
    return folder


@pytest.fixture(scope="module")
def app(model_dir: Path):
    with closing_app({"MODEL_DIR": str(model_dir), "MAX_CONTENT_LENGTH": 2 * 1024 * 1024}) as app:
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, path: str, data: bytes, filename: str = "x.png", headers: dict | None = None, **fields):
    form = {"file": (io.BytesIO(data), filename), **fields}
    return client.post(path, data=form, content_type="multipart/form-data", headers=headers or {})


def test_explain_answers_the_predictions_and_the_overlay(app, client, photos) -> None:
    data = photos["chelsea"].read_bytes()
    r = post(client, "/explain", data, "chelsea.png", top_k="3")
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert set(body) == set(client.get("/openapi.json").get_json()["components"]["schemas"]["Explanation"]["required"])
    assert body["model"] == "default" and body["method"] == "grad-cam" and body["layer"] == "_bn1"
    predicted = post(client, "/predict", data).get_json()["predictions"]
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in predicted]  # torch and ONNX agree
    for mine, served in zip(body["predictions"], predicted, strict=True):
        assert mine["score"] == pytest.approx(served["score"], abs=1e-4)
    assert body["explained"] == {"label": predicted[0]["label"], "index": predicted[0]["index"]}
    assert body["explained"]["label"] in CAT_LABELS
    picture = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert picture.format == "PNG" and picture.mode == "RGB" and picture.size == (224, 224)

    raw = post(client, "/explain", data, headers={"Accept": "image/png"})
    assert raw.status_code == 200 and raw.mimetype == "image/png"
    assert raw.headers["X-Explained-Index"] == str(body["explained"]["index"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw.data))), np.asarray(picture))
    # an image body works as it does for /predict
    body_only = client.post("/explain?model=tiny&top_k=2", data=data, content_type="image/png")
    assert body_only.status_code == 200 and len(body_only.get_json()["predictions"]) == 2
    assert body_only.get_json()["layer"] == "features"


def test_explain_refuses_what_predict_refuses_with_the_same_errors(client, photos) -> None:
    jpeg = image_bytes(Image.open(photos["chelsea"]).convert("RGB"), "JPEG")
    cases = [
        ({"data": b"%PDF-1.4 hello"}, 415, "not_an_image"),
        ({"data": b""}, 400, "empty_file"),
        ({"data": jpeg[: len(jpeg) // 2], "filename": "cut.jpg"}, 422, "corrupt_image"),
        ({"data": png_header_only(8000, 6000)}, 413, "too_many_pixels"),
        ({"data": jpeg, "model": "nope"}, 404, "model_not_found"),
        ({"data": jpeg, "top_k": "0"}, 400, "bad_top_k"),
        ({"data": b"\0" * (2 * 1024 * 1024 + 1)}, 413, "payload_too_large"),
    ]
    for case, status, code in cases:
        answers = [post(client, path, **case) for path in ("/explain", "/predict")]
        for r in answers:
            assert (r.status_code, r.mimetype, r.get_json()["error"]["code"]) == (status, "application/json", code)
            assert "Traceback" not in r.get_data(as_text=True)
    two = {"file": [(io.BytesIO(jpeg), "a.jpg"), (io.BytesIO(jpeg), "b.jpg")]}
    r = client.post("/explain", data=two, content_type="multipart/form-data")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "too_many_files"
    assert "one image" in r.get_json()["error"]["message"]
    r = client.post("/explain", data=b"{}", content_type="application/json")
    assert r.status_code == 415 and r.get_json()["error"]["code"] == "unsupported_media_type"
    assert client.get("/explain").status_code == 405


def test_concurrent_explanations_load_once_and_keep_to_their_own_photo(app, photos) -> None:
    """Captum hooks the model while it explains: requests at once must not see each other's activations."""
    names = ["chelsea", "coffee"] * 3

    def explain(name: str) -> dict:
        r = post(app.test_client(), "/explain", photos[name].read_bytes(), headers={"Accept": "application/json"})
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.get_json()

    alone = {name: explain(name) for name in ("chelsea", "coffee")}
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(explain, names))
    for name, body in zip(names, together, strict=True):
        assert body["explained"] == alone[name]["explained"]
        a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(x["overlay_png"])))) for x in (body, alone[name]))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert set(app.extensions[EXPLAINERS].load_seconds) <= {"default", "tiny"}
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert metric_samples(text, "imgclf_explanation_duration_seconds_count")['{model="default"}'] >= 8
    assert metric_samples(text, "imgclf_http_requests_total")['{endpoint="/explain",method="POST",status="200"}'] >= 8


def test_explanations_run_on_one_thread_of_their_own(app, photos, monkeypatch) -> None:
    """Gradients are computed on the explainers' own thread, whichever request thread took the request:
    with the worker's allocator keeping freed memory, each thread's heap arena would otherwise keep an
    explanation's worth of it (serving/explain.py)."""
    from model.explain import GradCam

    threads: list[str] = []
    real = GradCam.explain

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GradCam, "explain", recording)

    def explain(_: int) -> int:
        return post(app.test_client(), "/explain", photos["chelsea"].read_bytes()).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(explain, range(8))) == [200] * 8
    assert len(threads) == 8 and len(set(threads)) == 1 and threads[0].startswith("explain")


def test_explain_counts_against_the_admission_limit(model_dir: Path, photos) -> None:
    with closing_app({"MODEL_DIR": str(model_dir), "MAX_INFLIGHT": 1}) as app:
        client = app.test_client()
        gate = app.extensions[ADMISSION]
        assert gate.try_enter()  # a request in progress holds the only slot
        try:
            r = post(client, "/explain", photos["coffee"].read_bytes())
            assert r.status_code == 503 and r.get_json()["error"]["code"] == "busy" and r.headers["Retry-After"]
        finally:
            gate.leave()
        assert post(client, "/explain", photos["coffee"].read_bytes()).status_code == 200
        text = client.get("/metrics").get_data(as_text=True)
        assert metric_samples(text, "imgclf_rejected_requests_total") == {'{endpoint="/explain"}': 1.0}


def test_explanations_can_be_turned_off(model_dir: Path, photos, monkeypatch) -> None:
    monkeypatch.setenv("FLASK_EXPLAIN", "off")
    with closing_app({"MODEL_DIR": str(model_dir)}) as app:
        client = app.test_client()
        r = post(client, "/explain", photos["coffee"].read_bytes())
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "explanations_off"
        assert "FLASK_EXPLAIN" in r.get_json()["error"]["message"]
        assert "data-explain-url" not in client.get("/").get_data(as_text=True)
        assert app.extensions[EXPLAINERS].load_seconds == {}
    with closing_app({"MODEL_DIR": str(model_dir), "EXPLAIN": "on"}) as app:
        assert 'data-explain-url="/explain"' in app.test_client().get("/").get_data(as_text=True)
    with pytest.raises(ConfigError, match="EXPLAIN must be on or off"):
        create_app({"MODEL_DIR": str(model_dir), "EXPLAIN": "sometimes"})


def test_a_transformer_is_answered_422_on_the_torch_backend(tmp_path: Path, photos) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    torch.manual_seed(0)
    network = build_model("swin_t", num_classes=2, pretrained="none")
    prep = Preprocessing(resize=32, crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    save_bundle(make_bundle(arch="swin_t", arch_kwargs={}, class_names=["a", "b"], preprocessing=prep,
                            state_dict=network.state_dict()), folder / "swin.pth")  # fmt: skip
    with closing_app({"MODEL_DIR": str(folder), "DEFAULT_MODEL": "swin", "BACKEND": "torch"}) as app:
        client = app.test_client()
        assert post(client, "/predict", photos["coffee"].read_bytes()).status_code == 200
        for _ in range(2):  # the refusal is remembered, not rebuilt
            r = post(client, "/explain", photos["coffee"].read_bytes())
            assert r.status_code == 422, r.get_data(as_text=True)
            error = r.get_json()["error"]
            assert error["code"] == "explanation_unsupported" and "swin_t" in error["message"]


def test_a_bundle_changed_since_the_start_is_not_explained(model_dir: Path, tmp_path: Path, photos) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    tiny_bundle(folder / "tiny.pth", ["a", "b"])
    with closing_app({"MODEL_DIR": str(folder), "DEFAULT_MODEL": "tiny", "BACKEND": "torch"}) as app:
        tiny_bundle(folder / "tiny.pth", ["a", "b"], seed=5)  # retrained while it ran
        r = post(app.test_client(), "/explain", photos["coffee"].read_bytes())
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "not_ready"
        assert "restart" in r.get_json()["error"]["message"]


def test_an_onnx_worker_imports_torch_only_on_its_first_explanation(default_bundle, tmp_path: Path) -> None:
    """A gunicorn worker's path (the master's manifest): lean for /predict, torch loaded by /explain."""
    path = onnx_worker_manifest(default_bundle.parent, tmp_path)
    script = (
        "import sys, json\n"
        "from app import create_app\n"
        "from skimage import data_dir\n"
        "client = create_app({'MODEL_DIR': 'unused'}).test_client()\n"
        "heavy = lambda: sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'captum'))\n"
        "photo = lambda: {'file': (open(data_dir + '/chelsea.png', 'rb'), 'c.png')}\n"
        "before = (client.post('/predict', data=photo()).status_code, heavy())\n"
        "r = client.post('/explain', data=photo())\n"
        "print(json.dumps({'before': before, 'status': r.status_code, 'label': r.get_json()['explained']['label'],\n"
        "                  'after': 'torch' in sys.modules and 'captum' in sys.modules}))\n"
    )
    out = run_as_worker(script, path)
    assert out["before"] == [200, []]
    assert out["status"] == 200 and out["label"] in CAT_LABELS and out["after"] is True
