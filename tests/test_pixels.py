"""The eval preprocessing as the service runs it (Pillow + numpy to uint8, normalisation in the graph),
checked against the torchvision path it replaced, and the lean worker that it makes possible."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from model.bundle import load_bundle
from model.images import decode_image
from model.onnx_runner import OnnxPredictor
from model.pixels import LimitAspectRatio, ToModelMode, centre_crop_box, prepare, prepare_batch
from model.preprocessing import Preprocessing
from serving.prepare import prepare_models
from tests.support import ROOT

PREP = Preprocessing(resize=256, crop=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def torchvision_path(prep: Preprocessing) -> v2.Compose:
    """The eval transform as it was before model.pixels: torchvision's Resize and CenterCrop, then floats."""
    return v2.Compose(
        [
            ToModelMode(prep.channels),
            LimitAspectRatio(),
            v2.Resize(prep.resize, antialias=True),
            v2.CenterCrop(prep.crop),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(prep.mean), std=list(prep.std)),
        ]
    )


def phone_sized(path) -> bytes:
    """A real photo blown up to 12 MP and saved as a phone would (JPEG, quality 90)."""
    img = Image.open(path).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def test_prepare_gives_torchvisions_pixels_on_real_photos(photos) -> None:
    reference = v2.Compose([ToModelMode(3), v2.Resize(256, antialias=True), v2.CenterCrop(224)])
    for name, path in photos.items():
        img = decode_image(path.read_bytes(), draft_size=PREP.resize)
        got = prepare(img, PREP)
        want = np.asarray(reference(img)).transpose(2, 0, 1)
        assert got.dtype == np.uint8 and got.shape == (3, 224, 224), name
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01, (name, diff.max(), diff.mean())


def test_the_crop_box_is_the_centre_of_the_resized_image() -> None:
    assert centre_crop_box((256, 256), PREP) == (16.0, 16.0, 240.0, 240.0)
    left, top, right, bottom = centre_crop_box((4000, 3000), PREP)  # resized to 341x256, crop at (58, 16)
    assert (right - left) == pytest.approx(224 * 4000 / 341) and (bottom - top) == pytest.approx(224 * 3000 / 256)
    assert left == pytest.approx(58 * 4000 / 341) and top == pytest.approx(16 * 3000 / 256)


def test_grey_models_get_one_channel(photos) -> None:
    grey = Preprocessing(resize=32, crop=28, mean=[0.5], std=[0.5], channels=1)
    batch = prepare_batch([Image.open(photos["coffee"]), Image.open(photos["chelsea"])], grey)
    assert batch.shape == (2, 1, 28, 28) and batch.dtype == np.uint8 and batch.flags.c_contiguous


def test_the_served_export_answers_as_the_torchvision_path_did(default_bundle, photos) -> None:
    """Same top-1 and probabilities within 5e-3 on the real photos, small and phone-sized: the uint8
    pipeline with the normalisation inside the ONNX graph against torchvision floats into the network."""
    bundle, network = load_bundle(default_bundle)
    prep = bundle.preprocessing
    served = OnnxPredictor(default_bundle.with_suffix(".onnx"), device="cpu", warmup=False)
    old = torchvision_path(prep)
    files = [p.read_bytes() for p in photos.values()] + [phone_sized(photos["chelsea"]), phone_sized(photos["china"])]
    images = [decode_image(data, draft_size=prep.resize) for data in files]
    with torch.inference_mode():
        before = torch.softmax(network.eval()(torch.stack([old(img) for img in images])), dim=1).numpy()
    after = served.infer(served.preprocess(images))
    assert (after.argmax(1) == before.argmax(1)).all()
    assert np.abs(after - before).max() < 5e-3  # a grey level up or down on a few pixels


def onnx_worker_manifest(folder: Path, tmp_path: Path) -> Path:
    """The manifest gunicorn's master writes for ``folder`` on the ONNX backend (what a worker starts from)."""
    manifest = prepare_models({"BACKEND": "onnx", "DEVICE": "cpu", "MODEL_DIR": str(folder),
                               "DEFAULT_MODEL": "default", "ONNX_DIR": None})  # fmt: skip
    return manifest.write(tmp_path / "models.json")


def run_as_worker(script: str, manifest: Path) -> dict:
    """``script`` in a fresh interpreter set up as a gunicorn worker is (the master's manifest in
    IMGCLF_MANIFEST, nothing else imported); the JSON its last line prints."""
    env = {"IMGCLF_MANIFEST": str(manifest), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_onnx_worker_never_imports_torch(default_bundle, tmp_path) -> None:
    """What a gunicorn worker does with the master's manifest: create the app, answer a photo."""
    path = onnx_worker_manifest(default_bundle.parent, tmp_path)
    script = (
        "import sys, json\n"
        "from app import create_app\n"
        "from skimage import data_dir\n"
        "client = create_app({'MODEL_DIR': 'unused'}).test_client()\n"
        "with open(data_dir + '/chelsea.png', 'rb') as f:\n"
        "    r = client.post('/predict', data={'file': (f, 'c.png')})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(json.dumps({'status': r.status_code, 'top': r.get_json()['predictions'][0]['label'], 'heavy': heavy}))\n"
    )
    out = run_as_worker(script, path)
    assert out["status"] == 200 and out["top"] in {"tabby", "tiger cat", "Egyptian cat"}
    assert out["heavy"] == []


def test_a_changed_export_is_refused_by_the_worker(default_bundle, tmp_path) -> None:
    """The manifest pins each export's hash: a file swapped after the start-up check is not served."""
    models = tmp_path / "models"
    models.mkdir()
    for suffix in (".pth", ".onnx"):
        (models / f"default{suffix}").write_bytes(default_bundle.with_suffix(suffix).read_bytes())
    config = {
        "BACKEND": "onnx",
        "DEVICE": "cpu",
        "MODEL_DIR": str(models),
        "DEFAULT_MODEL": "default",
        "ONNX_DIR": None,
    }
    manifest = prepare_models(config)
    onnx = models / "default.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    from serving.registry import ModelLoadError, ModelRegistry

    with pytest.raises(ModelLoadError, match="changed after the service checked it"):
        ModelRegistry.load(manifest, num_threads=1, batch_max_delay_ms=0)


def test_images_already_the_models_size_pass_unchanged() -> None:
    """Fashion-MNIST's 28x28 greys with resize = crop = 28 (the README's models): not one pixel moves, so
    their test accuracy through the service's preprocessing is the one training measured."""
    grey = Preprocessing(resize=28, crop=28, mean=[0.286], std=[0.353], channels=1)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    assert np.array_equal(prepare(img, grey)[0], np.asarray(img))
