"""GoogLeNet and Inception v3: registered, trained with their auxiliary classifiers' losses, bundled and exported
without them, and started from a local weights file with no network. Real Fashion-MNIST images, small sizes."""

from __future__ import annotations

import json
import runpy
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual alias

from model.bundle import load_bundle, make_bundle, read_bundle, save_bundle
from model.export import get_args_parser, load_batch, main, sample_photos
from model.images import decode_image
from model.registry import (
    AUX_LOSS_WEIGHT,
    IMAGENET_MEAN,
    PretrainedWeightsUnavailable,
    aux_heads,
    build_model,
    find_head,
    head_names,
    pretrained_preprocessing,
)
from model.torch_predictor import TorchPredictor
from tests.test_training import run_train
from training.builders import set_backbone_trainable
from training.checkpoint import read_resume
from training.engine import train_one_epoch, training_loss

AUX = {"googlenet": ["aux1", "aux2"], "inception_v3": ["AuxLogits"]}
CLASSIFIERS = {"googlenet": ["fc", "aux1.fc2", "aux2.fc2"], "inception_v3": ["fc", "AuxLogits.fc"]}
CLASSES = ["Bag", "Sneaker", "Trouser"]
RUN = ["--epochs", "1", "--batch-size", "4", "--quiet", "--workers", "0", "--seed", "1",
       "--val-split", "0.25", "--test-split", "0.25"]  # fmt: skip


@pytest.fixture(scope="module")
def three_classes(fashion_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real Fashion-MNIST classes, 8 images each: 12 train, 6 val, 6 test."""
    data = tmp_path_factory.mktemp("three-classes")
    for name in CLASSES:
        (data / name).mkdir()
        for i, f in enumerate(sorted((fashion_subset / "train" / name).glob("*.png"))[:8]):
            (data / name / f"{i:02d}.png").write_bytes(f.read_bytes())
    return data


def real_batch(data: Path, size: int, per_class: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images of ``data``'s classes as one colour batch of ``size`` px, roughly normalised, and their labels."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((data / name).glob("*.png"))[:per_class]:
            grey = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            images.append(torch.from_numpy(np.array(grey)).permute(2, 0, 1).float() / 255)
            labels.append(label)
    return (torch.stack(images) - 0.3) / 0.35, torch.tensor(labels)


@pytest.mark.filterwarnings("ignore:'model.registry' found in sys.modules:RuntimeWarning")
def test_listed_by_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_module("model.registry", run_name="__main__")  # python -m model.registry
    listing = capsys.readouterr().out.split()
    assert {"googlenet", "inception_v3"} <= set(listing)
    assert not [name for name in listing if name.startswith("squeezenet")], "SqueezeNet's head is a convolution"


@pytest.mark.parametrize(("name", "size"), [("googlenet", 64), ("inception_v3", 80)])
def test_every_head_gets_the_class_count(name: str, size: int) -> None:
    model = build_model(name, num_classes=4)
    assert find_head(model) == "fc", "the main head, not an auxiliary classifier's last Linear"
    assert aux_heads(model) == AUX[name]
    assert head_names(model) == ["fc", *AUX[name]]
    assert [model.get_submodule(c).out_features for c in CLASSIFIERS[name]] == [4] * len(CLASSIFIERS[name])
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 4), "eval mode returns the main logits alone"
        if name == "googlenet":  # Inception v3's take 299 px: test_inception_v3_trains_its_auxiliary_classifier...
            outputs = model.train()(x)
            assert outputs.logits.shape == (2, 4)
            assert [a.shape for a in outputs[1:]] == [(2, 4)] * len(AUX[name])
    set_backbone_trainable(model, False)  # --freeze-backbone: the classifiers train, auxiliary ones included
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc", *AUX[name]}
    without = build_model(name, num_classes=4, aux_logits=False)
    assert aux_heads(without) == [] and find_head(without) == "fc"


def test_the_loss_adds_each_auxiliary_loss_at_the_papers_weight(three_classes: Path) -> None:
    assert AUX_LOSS_WEIGHT == 0.3
    torch.manual_seed(0)
    model = build_model("googlenet", num_classes=3).train()
    images, labels = real_batch(three_classes, 64, per_class=2)
    criterion = nn.CrossEntropyLoss()
    with torch.no_grad():
        outputs = model(images)
        loss, logits = training_loss(outputs, labels, criterion)
    main_loss, aux2, aux1 = (F.cross_entropy(o, labels) for o in outputs)
    assert torch.equal(logits, outputs.logits)
    assert loss.item() == pytest.approx((main_loss + 0.3 * aux2 + 0.3 * aux1).item(), rel=1e-6)
    plain_loss, plain_logits = training_loss(outputs.logits, labels, criterion)
    assert plain_loss.item() == pytest.approx(main_loss.item()) and plain_logits is outputs.logits
    soft = F.one_hot(labels, 3).float() * 0.8 + 0.2 / 3  # MixUp/CutMix targets take the same path
    mixed, _ = training_loss(outputs, soft, criterion)
    expected = sum(w * F.cross_entropy(o, soft) for w, o in zip((1, 0.3, 0.3), outputs, strict=True))
    assert mixed.item() == pytest.approx(expected.item(), rel=1e-6)


def test_inception_v3_trains_its_auxiliary_classifier_at_299_px(three_classes: Path) -> None:
    """One real step at the native size: the auxiliary classifier's loss reaches its weights."""
    torch.manual_seed(0)
    model = build_model("inception_v3", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = real_batch(three_classes, 299)
    with torch.no_grad():
        outputs = model.train()(images[:2])
    assert [o.shape for o in outputs] == [(2, 3), (2, 3)], "train mode: InceptionOutputs(logits, aux_logits)"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train_one_epoch(model, [(images[:2], labels[:2])], optimizer, nn.CrossEntropyLoss(),
                             torch.device("cpu"), progress=False)  # fmt: skip
    assert result.samples == 2
    after = model.state_dict()
    assert not torch.equal(after["AuxLogits.fc.weight"], before["AuxLogits.fc.weight"])
    assert not torch.equal(after["AuxLogits.conv0.conv.weight"], before["AuxLogits.conv0.conv.weight"])
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


def _photos_spread(bundle_path: Path) -> float:
    """How much the bundle's predictions differ between the sample photos (0: the same for all)."""
    bundle, model = load_bundle(bundle_path)
    batch = torch.from_numpy(load_batch(sample_photos(), bundle.preprocessing)).float() / 255
    mean = torch.tensor(bundle.preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.preprocessing.std).view(1, -1, 1, 1)
    with torch.no_grad():
        probs = model((batch - mean) / std).softmax(1)
    return float((probs.max(0).values - probs.min(0).values).max())


def _with_measured_norms(bundle_path: Path, data: Path, out: Path) -> Path:
    """The bundle with its BatchNorm statistics measured on real images, as many epochs would leave them.

    One epoch of a few steps barely moves them from their start, and the network, in eval mode, then says the
    same for every photo: a parity check of such an export proves little."""
    bundle, model = load_bundle(bundle_path)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches
    images, _ = real_batch(data, bundle.preprocessing.crop, per_class=4)
    with torch.no_grad():
        model.train()(images)
    save_bundle(make_bundle(arch=bundle.arch, arch_kwargs=bundle.arch_kwargs, class_names=bundle.class_names,
                            preprocessing=bundle.preprocessing, state_dict=model.state_dict()), out)  # fmt: skip
    return out


def _check_bundle_and_export(run: Path, name: str, data: Path, photos: dict[str, Path]) -> None:
    raw = torch.load(run / "best.pth", map_location="cpu", weights_only=True)
    assert raw["arch"] == {"name": name, "kwargs": {"transform_input": False, "aux_logits": False}}
    assert not [k for k in raw["state_dict"] if k.startswith(tuple(AUX[name]))], "auxiliary weights in the bundle"
    predictor = TorchPredictor.from_file(run / "best.pth", device="cpu")
    top = predictor.predict([decode_image(photos["chelsea"].read_bytes())], top_k=3)[0]
    assert sorted(t["label"] for t in top) == CLASSES
    assert sum(t["score"] for t in top) == pytest.approx(1.0, abs=1e-4)
    measured = _with_measured_norms(run / "best.pth", data, run / "measured.pth")
    assert _photos_spread(measured) > 1e-3, "the network should tell the photos apart"
    onnx_path = run / "measured.onnx"
    report = main(get_args_parser().parse_args(["--bundle", str(measured), "--out", str(onnx_path)]))
    assert report["fp32"]["max_abs_diff"] < 1e-4 and report["fp32"]["n"] == len(sample_photos())
    names = [i.name for i in onnx.load(str(onnx_path)).graph.initializer]
    assert not [n for n in names if any(a in n for a in AUX[name])], "auxiliary weights in the export"


def test_googlenet_from_scratch_end_to_end(three_classes: Path, tmp_path: Path, photos: dict[str, Path]) -> None:
    """Trained with its auxiliary classifiers (their weights move, kept for --resume in last.pth, left out of the
    bundles), resumed, then served and exported without them."""
    out = tmp_path / "run"
    common = ["--data", str(three_classes), "--out", str(out), "--arch", "googlenet", "--img-size", "64",
              "--pretrained", "none", *RUN]  # fmt: skip
    run_train(*common, "--epochs", "2", "--stop-after", "1")
    args = json.loads((out / "args.json").read_text())
    assert args["arch_kwargs"] == {"transform_input": False, "aux_logits": True}
    assert args["preprocessing"]["mean"] != list(IMAGENET_MEAN), "from scratch: the images' own statistics"
    first = read_resume(out / "last.pth")
    assert sorted({k.split(".")[0] for k in first["resume"]["aux_heads"]}) == AUX["googlenet"]
    assert not [k for k in first["state_dict"] if k.startswith(("aux1.", "aux2."))]
    result = run_train(*common, "--epochs", "2", "--resume", str(out / "last.pth"))
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    second = read_resume(out / "last.pth")["resume"]["aux_heads"]
    for key in ("aux1.fc2.weight", "aux2.conv.conv.weight"):
        assert not torch.equal(second[key], first["resume"]["aux_heads"][key]), f"{key} did not train"
    assert second["aux1.fc2.weight"].shape == (3, 1024)
    _check_bundle_and_export(out, "googlenet", three_classes, photos)


def test_inception_v3_from_scratch_at_80_px(three_classes: Path, tmp_path: Path, photos: dict[str, Path]) -> None:
    """Below 299 px Inception v3 trains without its auxiliary classifier (it cannot take the input), and says so."""
    out = tmp_path / "run"
    run_train("--data", str(three_classes), "--out", str(out), "--arch", "inception_v3", "--img-size", "80",
              "--pretrained", "none", *RUN)  # fmt: skip
    args = json.loads((out / "args.json").read_text())
    assert args["arch_kwargs"] == {"transform_input": False, "aux_logits": False}
    assert (args["preprocessing"]["crop"], args["preprocessing"]["resize"]) == (80, 91)
    assert "aux_heads" not in read_resume(out / "last.pth")["resume"]
    _check_bundle_and_export(out, "inception_v3", three_classes, photos)


def test_inception_v3_preprocessing_and_sizes(three_classes: Path, tmp_path: Path) -> None:
    native = pretrained_preprocessing("inception_v3")
    assert (native.resize, native.crop, native.mean) == (342, 299, IMAGENET_MEAN), "torchvision's weights' transforms"
    assert (pretrained_preprocessing("googlenet").resize, pretrained_preprocessing("googlenet").crop) == (256, 224)
    common = ["--data", str(three_classes), "--arch", "inception_v3", "--pretrained", "none", *RUN]
    with pytest.raises(SystemExit, match="inception_v3 needs inputs of at least 75 px"):
        run_train(*common, "--out", str(tmp_path / "small"), "--img-size", "64")
    with pytest.raises(SystemExit, match="auxiliary classifier needs inputs of at least 299 px"):
        run_train(*common, "--out", str(tmp_path / "aux"), "--img-size", "96", "--arch-kwargs", '{"aux_logits": true}')
    assert not (tmp_path / "small" / "args.json").exists(), "refused before training"


def test_transform_input_only_with_imagenet_normalisation(three_classes: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="transform_input rescales inputs normalised with ImageNet's"):
        run_train("--data", str(three_classes), "--out", str(tmp_path / "run"), "--arch", "googlenet",
                  "--img-size", "64", "--pretrained", "none", "--arch-kwargs", '{"transform_input": true}',
                  *RUN)  # fmt: skip


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_imagenet_weights_offline_fail_fast_with_guidance(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, as on a fresh machine
    started = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"--weights-file"):
        build_model(name, num_classes=2, pretrained="imagenet")
    assert time.monotonic() - started < 30, "must fail at once, not hang on the network"


def _torchvision_like_file(name: str, path: Path) -> dict[str, torch.Tensor]:
    """A state_dict shaped as torchvision's ImageNet file of ``name``: 1000 classes, auxiliary classifiers in."""
    torch.manual_seed(7)
    state = build_model(name, num_classes=1000).state_dict()
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_weights_file_builds_without_the_network(name: str, tmp_path: Path, no_network: None) -> None:
    source = _torchvision_like_file(name, tmp_path / f"{name}.pth")
    model = build_model(name, num_classes=4, weights_file=tmp_path / f"{name}.pth")
    state = model.state_dict()
    assert model.transform_input, "a weights file is treated as torchvision's: inputs rescaled as its weights expect"
    backbone = [k for k in source if not k.startswith(("fc.", *(f"{a}." for a in AUX[name])))]
    assert all(torch.equal(state[k], source[k]) for k in backbone)
    aux = AUX[name][0]
    kept = next(k for k in source if k.startswith(f"{aux}.") and k.endswith("conv.weight"))
    assert torch.equal(state[kept], source[kept]), "the auxiliary classifier starts from the file's weights"
    assert [model.get_submodule(c).out_features for c in CLASSIFIERS[name]] == [4] * len(CLASSIFIERS[name])
    without = build_model(name, num_classes=4, weights_file=tmp_path / f"{name}.pth", aux_logits=False)
    assert aux_heads(without) == [], "the file's auxiliary weights are ignored by a model without them"


def test_weights_file_fine_tunes_googlenet_without_the_network(
    three_classes: Path, tmp_path: Path, no_network: None
) -> None:
    source = _torchvision_like_file("googlenet", tmp_path / "googlenet.pth")
    out = tmp_path / "run"
    run_train("--data", str(three_classes), "--out", str(out), "--arch", "googlenet", "--weights-file",
              str(tmp_path / "googlenet.pth"), "--img-size", "64", *RUN)  # fmt: skip
    args = json.loads((out / "args.json").read_text())
    assert args["arch_kwargs"] == {"transform_input": True, "aux_logits": True}
    assert tuple(args["preprocessing"]["mean"]) == IMAGENET_MEAN, "what transform_input assumes"
    aux = read_resume(out / "last.pth")["resume"]["aux_heads"]
    assert not torch.equal(aux["aux1.conv.conv.weight"], source["aux1.conv.conv.weight"]), "aux1 did not train"
    bundle = read_bundle(out / "best.pth")
    assert bundle.arch_kwargs == {"transform_input": True, "aux_logits": False}
    _, model = load_bundle(out / "best.pth")
    assert model.transform_input and not model.aux_logits and model.aux1 is None
