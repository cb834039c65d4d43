"""The model's first step: uint8 pixels (N, C, H, W) -> ``(x / 255 - mean) / std``, inside the model.

Preprocessing (``model.pixels``) stops at uint8 so that a request's pixels travel as one byte each (to
ONNX Runtime, to a GPU) and no process but the model's needs a float copy of them. Wrapping the
network with this module puts the normalisation where the network runs: in the exported ONNX graph,
in the TorchScript file and in the torch backend, on the GPU when the model is there. Training keeps
torchvision's ``ToDtype(scale=True)`` + ``Normalize`` on float batches: the same arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from model.preprocessing import Preprocessing


class NormalizedInput(nn.Module):
    """``model`` behind the normalisation its preprocessing names: takes uint8 (or float 0..255) batches."""

    def __init__(self, model: nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.model = model
        shape = (1, prep.channels, 1, 1)
        mean = torch.tensor(prep.mean, dtype=torch.float32).reshape(shape)
        std = torch.tensor(prep.std, dtype=torch.float32).reshape(shape)
        # (x / 255 - mean) / std, as torchvision's ToDtype(scale=True) then Normalize compute it
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.mean.dtype
        return self.model((x.to(dtype) / 255.0 - self.mean) / self.std)
