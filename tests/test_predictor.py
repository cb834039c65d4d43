"""The Predictor's separate steps, on the real default model and on small bundles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import read_bundle
from model.images import decode_image
from model.onnx_runner import OnnxPredictor
from model.predictor import Predictor, available_cpus
from model.torch_predictor import TorchPredictor, resolve_device
from tests.support.bundles import tiny_bundle

CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def default_predictor(default_bundle) -> Predictor:
    return TorchPredictor.from_file(default_bundle, device="cpu")


def test_default_model_knows_a_cat_and_an_espresso(default_predictor: Predictor, photos) -> None:
    cat, coffee = default_predictor.predict(
        [decode_image(photos["chelsea"].read_bytes()), decode_image(photos["coffee"].read_bytes())], top_k=3
    )
    assert cat[0]["label"] in CAT_CLASSES
    assert {"espresso", "cup", "coffee mug"} & {p["label"] for p in coffee}


def test_steps_are_separate_and_consistent(default_predictor: Predictor, photos) -> None:
    images = [Image.open(photos["chelsea"]), Image.open(photos["astronaut"])]
    batch = default_predictor.preprocess(images)
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.uint8
    probs = default_predictor.infer(batch)
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(1), np.ones(2), atol=1e-4)
    top = default_predictor.postprocess(probs, top_k=5)
    assert [len(r) for r in top] == [5, 5]
    for row in top:
        scores = [p["score"] for p in row]
        assert scores == sorted(scores, reverse=True)
        assert all(default_predictor.class_names[p["index"]] == p["label"] for p in row)
    # batching does not change the answer for an image
    alone = default_predictor.infer(default_predictor.preprocess(images[:1]))
    np.testing.assert_allclose(alone[0], probs[0], atol=1e-5)


def test_top_k_is_clamped(tmp_path) -> None:
    predictor = TorchPredictor.from_file(tiny_bundle(tmp_path / "t.pth", ["a", "b", "c"]), device="cpu")
    result = predictor.predict([Image.new("RGB", (40, 30), "red")], top_k=50)
    assert len(result[0]) == 3
    assert predictor.describe()["class_names"] == ["a", "b", "c"]


def test_temperature_changes_scores_not_ranking(tmp_path) -> None:
    path = tiny_bundle(tmp_path / "t.pth", ["a", "b", "c", "d"], seed=5)
    bundle = read_bundle(path)
    img = [Image.new("RGB", (32, 32), (10, 200, 30))]
    plain = TorchPredictor(bundle, device="cpu").predict(img, top_k=4)[0]
    soft = TorchPredictor(dataclasses.replace(bundle, temperature=3.0), device="cpu").predict(img, top_k=4)[0]
    assert [p["label"] for p in plain] == [p["label"] for p in soft]
    assert soft[0]["score"] < plain[0]["score"]


def test_device_selection() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_threads_follow_affinity(tmp_path) -> None:
    predictor = TorchPredictor.from_file(tiny_bundle(tmp_path / "t.pth", ["a", "b"]), device="cpu")
    assert predictor.num_threads == available_cpus() == torch.get_num_threads()


def test_torch_and_onnx_share_one_predictor_base(default_bundle, photos) -> None:
    """Both backends are a Predictor that differs only in loading and ``infer``: same steps, same answers."""
    with pytest.raises(TypeError, match="abstract"):
        Predictor()  # type: ignore[abstract] - only a backend's subclass can be made
    eager = TorchPredictor.from_file(default_bundle, device="cpu", warmup=False)
    onnx = OnnxPredictor(default_bundle.with_suffix(".onnx"), device="cpu", warmup=False)
    for predictor in (eager, onnx):
        assert isinstance(predictor, Predictor)
        for shared in ("preprocess", "postprocess", "predict", "warm_up", "input_shape"):
            assert shared not in type(predictor).__dict__, f"{type(predictor).__name__} redefines {shared}"
    same = ("name", "arch", "num_classes", "class_names", "preprocessing", "temperature")
    assert {k: eager.describe()[k] for k in same} == {k: onnx.describe()[k] for k in same}
    assert (eager.describe()["backend"], onnx.describe()["backend"]) == ("torch", "onnx")
    images = [decode_image(photos["chelsea"])]
    assert [p["label"] for p in eager.predict(images)[0]] == [p["label"] for p in onnx.predict(images)[0]]
