"""Grad-CAM heat maps: where in the photo a bundle's network found what raised its score, with Captum.

Captum's ``LayerGradCam`` weighs each channel of a convolutional feature map by the mean gradient of the
class score over it, keeps the positive sum, and ``LayerAttribution.interpolate`` brings the coarse map
(7 x 7 for a 224 px ImageNet model) up to the input's size. Captum (BSD-3, PyTorch's own attribution
library) is used rather than PyPI's ``grad-cam``, which would bring OpenCV, ttach and scikit-learn.

The map is computed on the network behind ``NormalizedInput``, from the uint8 pixels ``model.pixels``
prepares: the explanation is of the model exactly as it is served, on the crop it sees. The feature map
is found by ``target_layer`` for every architecture of the registry with convolutional features;
transformers (ViT, Swin, MaxViT) have no such map near their head and are refused
(``ExplanationUnsupported``).
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from PIL import Image
from torch import nn

from model.bundle import Bundle, model_from_bundle
from model.normalization import NormalizedInput
from model.preprocessing import Preprocessing

# Layers that only resample or mask a feature map: Grad-CAM takes the map they are given.
_PASS_THROUGH = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Flatten,
)
COLORMAP = "turbo"  # blue (nothing) to red (most): the usual heat-map reading, brighter than jet
OVERLAY_ALPHA = 0.5  # the heat map's weight over the photo


class ExplanationUnsupported(ValueError):
    """An architecture without a convolutional feature map near its head (transformers)."""


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__


def target_layer(network: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """The qualified name of the feature map Grad-CAM reads: the last module, in the order a forward pass
    finishes them, whose output is a spatial map (N, C, H, W with H, W > 1), run once per pass, and not a
    pooling, dropout or identity layer. That is torchvision ResNets' ``layer4``, DenseNet's, MobileNet's,
    EfficientNet's, ConvNeXt's and VGG's ``features``, SimpleCNN's ``features`` and EfficientNet-Lite's
    ``_bn1``: the last convolutional block before global pooling.

    ``input_shape`` (C, H, W) is the model's input: one forward pass of zeros finds the shapes.
    """
    attention = [name for name, m in network.named_modules() if _is_attention(m)]
    if attention:
        raise ExplanationUnsupported(
            f"{type(network).__name__} is a transformer (attention in {attention[0]!r}): Grad-CAM needs a "
            "convolutional feature map near the head, which it does not have"
        )
    finished: list[tuple[str, tuple[int, ...]]] = []
    calls: dict[str, int] = {}
    hooks = []
    for name, module in network.named_modules():
        if not name:
            continue

        def record(_module: nn.Module, _args: object, output: object, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                finished.append((name, tuple(output.shape)))

        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            network(torch.zeros(1, *input_shape, device=next(network.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    for name, shape in reversed(finished):
        module = network.get_submodule(name)
        if len(shape) == 4 and min(shape[2:]) > 1 and calls[name] == 1 and not isinstance(module, _PASS_THROUGH):
            return name
    raise ExplanationUnsupported(f"{type(network).__name__} has no spatial feature map for Grad-CAM")


@dataclass(frozen=True)
class Explanation:
    """One image's Grad-CAM: ``heatmap`` (H, W) float32 in [0, 1] over the model's input, for class
    ``target``, and the network's ``logits`` for the image (the scores come from the same pass)."""

    target: int
    heatmap: np.ndarray
    logits: np.ndarray


class GradCam:
    """Grad-CAM of a bundle's network. One explanation runs at a time (Captum hooks the layer for the
    duration of a call, so two threads at once would see each other's activations)."""

    def __init__(self, network: nn.Module, prep: Preprocessing, *, layer: str | None = None) -> None:
        network.eval()
        input_shape = (prep.channels, prep.crop, prep.crop)
        self.layer = layer or target_layer(network, input_shape)
        device = next(network.parameters()).device
        self.model = NormalizedInput(network, prep).eval().to(device)
        self._cam = LayerGradCam(self.model, network.get_submodule(self.layer))
        self._tta = bool(getattr(network, "tta_hflip", False))
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, device: str = "cpu", source: str = "bundle") -> GradCam:
        """The bundle's network, built and loaded (``model_from_bundle``), on ``device``."""
        network = model_from_bundle(bundle, source=source).to(torch.device(device))
        return cls(network, bundle.preprocessing)

    @property
    def device(self) -> torch.device:
        return self.model.mean.device

    def explain(self, batch: np.ndarray, targets: list[int] | None = None) -> list[Explanation]:
        """uint8 pixels (N, C, H, W) as ``model.pixels.prepare`` makes them -> one heat map each, for
        ``targets`` (class indices; default: each image's top-1 class)."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, torch.float32)
        with self._lock:
            with torch.no_grad():
                logits = self.model(x).float()
            if targets is None:
                targets = logits.argmax(1).tolist()
            maps = self._cam.attribute(x, target=list(targets), relu_attributions=True).detach()
            if self._tta and maps.shape[0] == 2 * x.shape[0]:
                # the network scored each image and its mirror (SimpleCNN's tta_hflip): one map each,
                # the mirror's turned back, averaged
                maps = (maps[: x.shape[0]] + maps[x.shape[0] :].flip(-1)) / 2
            maps = LayerAttribution.interpolate(maps, tuple(x.shape[2:]), interpolate_mode="bilinear")
        heat = maps[:, 0].clamp_min(0).cpu().numpy().astype(np.float32)
        peak = heat.reshape(len(heat), -1).max(1)
        heat /= np.where(peak > 0, peak, 1.0)[:, None, None]  # an all-zero map (nothing helped) stays zero
        rows = logits.cpu().numpy()
        return [Explanation(int(t), h, row) for t, h, row in zip(targets, heat, rows, strict=True)]


def overlay(pixels: np.ndarray, heatmap: np.ndarray, *, scale: int = 1, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The model's input (uint8 (C, H, W), grey or RGB) with ``heatmap`` (H, W in [0, 1]) blended over it in
    the ``COLORMAP``, as an RGB image; ``scale`` enlarges it (nearest, so small inputs stay sharp)."""
    if pixels.ndim != 3 or pixels.shape[1:] != heatmap.shape:
        raise ValueError(f"pixels {pixels.shape} and heat map {heatmap.shape} do not match")
    photo = _rgb(pixels).astype(np.float32)
    colours = matplotlib.colormaps[COLORMAP](np.clip(heatmap, 0, 1))[..., :3] * 255
    blended = np.clip((1 - alpha) * photo + alpha * colours, 0, 255).round().astype(np.uint8)
    return _enlarged(Image.fromarray(blended, mode="RGB"), scale)


def input_image(pixels: np.ndarray, *, scale: int = 1) -> Image.Image:
    """The model's input (uint8 (C, H, W)) as an RGB image, enlarged like ``overlay``: what it saw."""
    return _enlarged(Image.fromarray(_rgb(pixels), mode="RGB"), scale)


def _rgb(pixels: np.ndarray) -> np.ndarray:
    return (np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels).transpose(1, 2, 0)


def _enlarged(img: Image.Image, scale: int) -> Image.Image:
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
