"""Fine-tuning done properly, on real data: a local weights file is all a torchvision network needs offline."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from model.bundle import read_bundle
from model.registry import build_model
from tests.test_training import FAST, run_train


class NetworkUsed(AssertionError):
    """Raised by every way out of this machine while a test forbids the network."""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Any connection or name lookup fails the test, and torch's weight cache is empty (as on a fresh machine):
    a download attempted would be seen, not served from the cache or hidden by a failed connection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkUsed(f"network used: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def test_the_guard_sees_a_download(no_network: None) -> None:
    with pytest.raises(NetworkUsed):
        build_model("resnet18", num_classes=2, pretrained="imagenet")


def test_weights_file_trains_a_torchvision_network_without_the_network(
    two_class_images, tmp_path: Path, no_network: None
) -> None:
    torch.manual_seed(5)
    source = build_model("resnet18", num_classes=1000)
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    data = tmp_path / "data"
    for name, files in two_class_images.items():
        (data / name).mkdir(parents=True)
        for i, f in enumerate(files[:10]):
            (data / name / f"{i:03d}.png").write_bytes(f.read_bytes())
    out = tmp_path / "run"
    run_train("--data", str(data), "--out", str(out), "--arch", "resnet18", "--weights-file", str(weights),
              "--img-size", "32", "--val-split", "0.2", "--test-split", "0.2", *FAST)  # fmt: skip
    args = json.loads((out / "args.json").read_text())
    assert (args["pretrained"], args["weights_file"]) == ("none", str(weights))
    assert args["lr"] == pytest.approx(0.01 * 16 / 128), "a weights file is a pretrained start: the fine-tuning lr"
    trained = read_bundle(out / "last.pth").state_dict
    assert trained["fc.weight"].shape == (2, 512)
    assert not torch.equal(trained["conv1.weight"], source.conv1.weight), "the backbone did not train"
    # one step from the file's weights: close to them, unlike a fresh random initialisation
    moved = (trained["conv1.weight"] - source.conv1.weight).abs().max()
    fresh = (build_model("resnet18", num_classes=2).conv1.weight - source.conv1.weight).abs().max()
    assert moved < fresh / 10


def test_weights_file_with_pretrained_imagenet_is_refused(fashion_subset: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--weights-file replaces"):
        run_train("--data", str(fashion_subset), "--out", str(tmp_path / "run"), "--arch", "resnet18",
                  "--pretrained", "imagenet", "--weights-file", str(tmp_path / "w.pth"), *FAST)  # fmt: skip
