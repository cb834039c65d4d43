"""Every registered architecture builds with a new head and runs; pretrained sources behave offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from model.registry import (
    PretrainedWeightsUnavailable,
    build_model,
    find_head,
    is_known_architecture,
    list_architectures,
    pretrained_preprocessing,
)

REQUIRED = [
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "convnext_tiny", "vit_b_16", "alexnet", "vgg11", "densenet121", "regnet_y_400mf",
    "shufflenet_v2_x1_0", "simple_cnn", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
]  # fmt: skip


def test_required_architectures_are_registered() -> None:
    names = set(list_architectures())
    assert set(REQUIRED) <= names
    assert not is_known_architecture("resnet9000")


@pytest.mark.parametrize("name", REQUIRED)
def test_builds_with_new_head_and_runs_forward(name: str) -> None:
    model = build_model(name, num_classes=7).eval()
    head = model.get_submodule(find_head(model))
    assert head.out_features == 7
    # vit_b_16 is fixed to 224 px; AlexNet/VGG need at least 63 px; others run on a smaller input.
    size = 224 if name.startswith("vit") else 64
    with torch.no_grad():
        out = model(torch.rand(1, 3, size, size))
    assert out.shape == (1, 7)


@pytest.mark.parametrize("size,channels", [(28, 1), (45, 3), (96, 1)])
def test_simple_cnn_any_size_and_channels(size: int, channels: int) -> None:
    model = build_model("simple_cnn", num_classes=3, in_channels=channels).eval()
    with torch.no_grad():
        assert model(torch.rand(2, channels, size, size)).shape == (2, 3)


def test_torchvision_pretrained_offline_fails_fast_with_guidance(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, as on a fresh machine
    started = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"--weights-file"):
        build_model("resnet18", num_classes=2, pretrained="imagenet")
    assert time.monotonic() - started < 30, "must fail at once, not hang on the network"


def test_weights_file_source(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = build_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", num_classes=4, weights_file=path)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 4  # ImageNet head skipped and replaced


def test_weights_file_that_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(build_model("mobilenet_v2", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="weights do not fit"):
        build_model("resnet18", num_classes=10, weights_file=path)


def test_offline_efficientnet_lite_weights_load() -> None:
    pretrained = build_model("efficientnet_lite0", num_classes=5, pretrained="imagenet")
    scratch = build_model("efficientnet_lite0", num_classes=5, pretrained="none")
    assert not torch.equal(pretrained._conv_stem.weight, scratch._conv_stem.weight)
    assert pretrained._fc.out_features == 5


def test_pretrained_preprocessing() -> None:
    assert pretrained_preprocessing("resnet18").crop == 224
    assert pretrained_preprocessing("efficientnet_lite1").crop == 240
    assert pretrained_preprocessing("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    assert pretrained_preprocessing("simple_cnn") is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet9000", num_classes=2)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("simple_cnn", num_classes=2, pretrained="imagenet")
    with pytest.raises(ValueError, match="3-channel"):
        build_model("resnet18", num_classes=2, in_channels=1)
