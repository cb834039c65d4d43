"""`--batch-aug` (whole batches augmented on the cached uint8 tensor) and simple_cnn's flip test-time augmentation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn import functional as F  # noqa: N812 - the usual alias

from model.bundle import load_bundle, make_bundle, save_bundle
from model.export import export_onnx
from model.onnx_runner import OnnxPredictor
from model.preprocessing import Preprocessing
from model.simple_cnn import SimpleCNN
from model.torch_predictor import TorchPredictor
from model.transforms import TrainAugment, build_eval_transform, build_normalize
from tests.test_training import FAST, _check_run, run_train
from training import prepare_fashion_mnist
from training.batch_augment import BatchAugment, TensorImageDataset, batch_augment_problem
from training.data import find_splits

PREP = Preprocessing(resize=28, crop=28, mean=[0.2860], std=[0.3530], channels=1)


@pytest.fixture(scope="module")
def cached(fashion_subset: Path) -> tuple[TensorImageDataset, list[Path]]:
    samples = find_splits(fashion_subset, val_split=0.1).train
    return TensorImageDataset(samples, PREP), [p for p, _ in samples]


def _eval_batch(paths: list[Path]) -> torch.Tensor:
    transform = build_eval_transform(PREP)
    return torch.stack([transform(Image.open(p)) for p in paths])


def test_cached_tensor_is_the_eval_transform_before_normalising(cached) -> None:
    dataset, paths = cached
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (len(paths), 1, 28, 28)
    assert torch.equal(build_normalize(PREP)(dataset.images[:16]), _eval_batch(paths[:16]))
    assert dataset.targets == [dataset[i][1] for i in range(len(dataset))]


def test_no_augmentation_gives_exactly_the_eval_input(cached) -> None:
    dataset, paths = cached
    plain = BatchAugment(PREP, TrainAugment(pad=0, hflip=0, random_erasing=0), channels_last=True)
    out = plain(dataset.images[:16])
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, _eval_batch(paths[:16]))


def test_pad_crop_and_flip_are_drawn_per_image(cached) -> None:
    dataset, _ = cached
    torch.manual_seed(0)
    images = dataset.images[:64]
    out = BatchAugment(PREP, TrainAugment(pad=2, hflip=0.5, random_erasing=0))(images)
    padded = F.pad(build_normalize(PREP)(images), (2, 2, 2, 2), mode="reflect")

    def window(i: int, dy: int, dx: int, flip: bool) -> torch.Tensor:
        w = padded[i, :, dy : dy + 28, dx : dx + 28]
        return w.flip(-1) if flip else w

    drawn = set()
    for i in range(len(images)):
        views = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)]
        found = [v for v in views if torch.equal(out[i], window(i, *v))]
        assert found, f"image {i} is not a flipped or unflipped 28 px window of its reflect-padded self"
        drawn.add(found[0])
    assert len({(dy, dx) for dy, dx, _ in drawn}) > 5, "crop offsets are not drawn per image"
    assert {flip for _, _, flip in drawn} == {False, True}, "flips are not drawn per image"


def test_vertical_flips_are_drawn_per_image(cached) -> None:
    dataset, _ = cached
    torch.manual_seed(0)
    images = dataset.images[:32]
    out = BatchAugment(PREP, TrainAugment(pad=0, hflip=0, vflip=0.5))(images)
    plain = build_normalize(PREP)(images)
    flipped = [torch.equal(out[i], plain[i].flip(-2)) for i in range(len(images))]
    assert all(f or torch.equal(out[i], plain[i]) for i, f in enumerate(flipped)), "not the image or its flip"
    assert 0 < sum(flipped) < len(images), "vertical flips are not drawn per image"


def test_random_erasing_blanks_one_rectangle_per_image(cached) -> None:
    dataset, _ = cached
    torch.manual_seed(0)
    images = dataset.images[:32]
    clean = BatchAugment(PREP, TrainAugment(pad=0, hflip=0, random_erasing=0))(images)
    erased = BatchAugment(PREP, TrainAugment(pad=0, hflip=0, random_erasing=1.0))(images)
    assert int((clean == 0).sum()) == 0  # normalised Fashion-MNIST pixels are never exactly 0
    boxes = set()
    for i in range(len(images)):
        rows, cols = torch.nonzero(erased[i, 0] == 0, as_tuple=True)
        assert len(rows) > 0, f"image {i} was not erased"
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert (erased[i, 0, top:bottom, left:right] == 0).all(), "the erased area is not a rectangle"
        assert 0.01 <= len(rows) / 28**2 <= 0.4
        outside = erased[i] != 0
        assert torch.equal(erased[i][outside], clean[i][outside]), "pixels outside the rectangle changed"
        boxes.add((int(top), int(bottom), int(left), int(right)))
    assert len(boxes) > 10, "rectangles are not drawn per image"


def test_what_batch_aug_cannot_do_is_refused(fashion_subset: Path, tmp_path: Path) -> None:
    assert batch_augment_problem(PREP, TrainAugment()) is None
    assert "random-resized" in batch_augment_problem(PREP, TrainAugment(crop="random-resized"))
    assert "--auto-augment" in batch_augment_problem(PREP, TrainAugment(auto_augment="trivialaugment"))
    assert "--rotation" in batch_augment_problem(PREP, TrainAugment(rotation=10))
    assert "--hue" in batch_augment_problem(PREP, TrainAugment(hue=0.1))
    assert batch_augment_problem(PREP, TrainAugment(vflip=0.5)) is None
    big = dataclasses.replace(PREP, resize=128, crop=112)
    assert batch_augment_problem(big, TrainAugment()) is not None  # large images get RandomResizedCrop
    with pytest.raises(SystemExit, match="--batch-aug"):
        run_train("--data", str(fashion_subset), "--out", str(tmp_path / "run"), *FAST,
                  "--batch-aug", "--auto-augment", "trivialaugment")  # fmt: skip


def test_training_with_batch_aug_and_flip_tta(fashion_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_train("--data", str(fashion_subset), "--out", str(out), *FAST, "--batch-aug", "--channels-last",
              "--random-erasing", "0.5", "--arch-kwargs", '{"width": 8, "tta_hflip": true}')  # fmt: skip
    bundle = _check_run(out, sorted(prepare_fashion_mnist.CLASS_NAMES))
    assert bundle.arch_kwargs["tta_hflip"] is True
    assert bundle.training["args"]["batch_aug"] is True


def _logits(model: SimpleCNN, x: torch.Tensor, tta: bool) -> torch.Tensor:
    model.tta_hflip = tta
    with torch.no_grad():
        return model(x)


def test_flip_tta_averages_the_logits_of_image_and_mirror() -> None:
    torch.manual_seed(0)
    model = SimpleCNN(5, 1, width=4, stages=2).eval()
    x = torch.randn(3, 1, 28, 28) + torch.linspace(-3, 3, 28)  # bright on the right: the mirror differs
    plain, mirrored = _logits(model, x, False), _logits(model, x.flip(-1), False)
    assert (plain - mirrored).abs().max() > 1e-3, "the mirror must give other logits, or this test shows nothing"
    assert torch.allclose(_logits(model, x, True), (plain + mirrored) / 2, atol=1e-6)
    model.train()
    torch.manual_seed(1)
    trained_view = _logits(model, x, True)
    torch.manual_seed(1)
    assert torch.equal(trained_view, _logits(model, x, False)), "training must see the plain image"


def test_flip_tta_travels_with_the_bundle_to_predictor_and_onnx(photos, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SimpleCNN(4, 3, width=4, stages=2, tta_hflip=True)
    bundle = make_bundle(
        arch="simple_cnn",
        arch_kwargs={"width": 4, "stages": 2, "tta_hflip": True},
        class_names=["a", "b", "c", "d"],
        preprocessing=Preprocessing(resize=36, crop=32, mean=[0.5] * 3, std=[0.25] * 3),
        state_dict=model.state_dict(),
    )
    save_bundle(bundle, tmp_path / "tta.pth")
    loaded, rebuilt = load_bundle(tmp_path / "tta.pth")
    assert rebuilt.tta_hflip and not rebuilt.training
    image = Image.open(photos["chelsea"])
    x = build_eval_transform(loaded.preprocessing)(image)[None]
    expected = ((_logits(rebuilt, x, False) + _logits(rebuilt, x.flip(-1), False)) / 2).softmax(1)[0]
    rebuilt.tta_hflip = True
    top = TorchPredictor.from_file(tmp_path / "tta.pth", device="cpu").predict([image], top_k=4)[0]
    assert [p["index"] for p in top] == expected.argsort(descending=True).tolist()
    assert max(abs(p["score"] - expected[p["index"]].item()) for p in top) < 1e-5
    export_onnx(loaded, rebuilt, tmp_path / "tta.onnx")
    onnx_top = OnnxPredictor(tmp_path / "tta.onnx", device="cpu").predict([image], top_k=4)[0]
    assert [p["index"] for p in onnx_top] == [p["index"] for p in top]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(onnx_top, top, strict=True)) < 1e-5
