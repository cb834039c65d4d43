"""Export to ONNX / TorchScript: parity with torch on real photos, metadata round trip, int8, bench --quick."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model.bundle import BundleError, load_bundle, make_bundle, save_bundle
from model.default import ensure_default_model
from model.export import get_args_parser, load_batch, load_torchscript, main, sample_photos
from model.export_metadata import parse_metadata
from model.normalization import NormalizedInput
from model.onnx_runner import OnnxPredictor, read_onnx_metadata
from model.pixels import prepare
from model.preprocessing import Preprocessing
from model.registry import build_model

REPO = Path(__file__).resolve().parent.parent
PHOTOS = sample_photos()


def photo(name: str) -> Path:
    return next(p for p in PHOTOS if p.name == name)


@pytest.fixture(scope="module")
def default_bundle() -> Path:
    return ensure_default_model(REPO / "models" / "default.pth")


@pytest.fixture(scope="module")
def torch_default(default_bundle: Path):
    return load_bundle(default_bundle)


@pytest.fixture(scope="module")
def onnx_export(default_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("onnx") / "default.onnx"
    return main(
        get_args_parser().parse_args(["--bundle", str(default_bundle), "--out", str(out), "--quantize", "dynamic"])
    )


def torch_probs(torch_default, batch: np.ndarray) -> np.ndarray:
    """The bundle's network in torch, behind the same normalisation, on a uint8 batch."""
    bundle, model = torch_default
    with torch.inference_mode():
        logits = NormalizedInput(model, bundle.preprocessing).eval()(torch.from_numpy(batch))
        return torch.softmax(logits / bundle.temperature, dim=1).numpy()


def test_sample_photos_are_real() -> None:
    assert {p.name for p in PHOTOS} == {"chelsea.png", "coffee.png", "astronaut.png", "china.jpg", "flower.jpg"}


def test_onnx_fp32_parity_on_real_photos(onnx_export: dict, torch_default) -> None:
    bundle, _ = torch_default
    assert onnx_export["fp32"]["max_abs_diff"] < 1e-4
    runner = OnnxPredictor(onnx_export["fp32"]["file"], device="cpu", num_threads=1)
    batch = load_batch(PHOTOS, bundle.preprocessing)
    reference = torch_probs(torch_default, batch)
    assert np.abs(runner.infer(batch) - reference).max() < 1e-4
    # the batch axis is dynamic: one image alone gives the same answer as inside the batch of five
    assert np.abs(runner.infer(batch[2:3]) - reference[2:3]).max() < 1e-4
    top = runner.predict([_open(photo("chelsea.png"))], top_k=3)[0]
    assert top[0]["label"] in ("Egyptian cat", "tabby", "tiger cat")


def _open(path: Path):
    from model.images import decode_image

    return decode_image(path)


def test_onnx_file_is_one_checked_file_with_metadata(onnx_export: dict, torch_default) -> None:
    bundle, _ = torch_default
    path = Path(onnx_export["fp32"]["file"])
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
    meta = parse_metadata(read_onnx_metadata(path))
    assert meta.class_names == bundle.class_names
    assert meta.preprocessing == bundle.preprocessing
    assert (meta.arch, meta.arch_kwargs) == (bundle.arch, bundle.arch_kwargs)
    assert meta.temperature == bundle.temperature
    raw = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(raw["class_names"]) == list(bundle.class_names)
    assert json.loads(raw["preprocessing"]) == bundle.preprocessing.to_dict()
    assert json.loads(raw["arch"]) == {"name": bundle.arch, "kwargs": bundle.arch_kwargs}
    # a reader prepares the very same pixels from the file alone, and knows the input is those pixels
    img = _open(photo("coffee.png"))
    assert np.array_equal(prepare(img, meta.preprocessing), prepare(img, bundle.preprocessing))
    assert json.loads(raw["input"]) == {"dtype": "uint8", "layout": "NCHW", "normalization": "in-graph"}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_onnx_without_metadata_is_refused(onnx_export: dict, tmp_path: Path) -> None:
    proto = onnx.load(onnx_export["fp32"]["file"])
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(BundleError, match="metadata lacks"):
        OnnxPredictor(bare, device="cpu")


def test_int8_dynamic_keeps_top1_on_chelsea_and_coffee(onnx_export: dict, torch_default) -> None:
    bundle, _ = torch_default
    assert onnx_export["int8"]["mode"] == "dynamic"
    int8 = OnnxPredictor(onnx_export["int8"]["file"], device="cpu")
    fp32 = OnnxPredictor(onnx_export["fp32"]["file"], device="cpu")
    batch = load_batch([photo("chelsea.png"), photo("coffee.png")], bundle.preprocessing)
    assert np.array_equal(int8.infer(batch).argmax(1), fp32.infer(batch).argmax(1))
    assert Path(onnx_export["int8"]["file"]).stat().st_size < Path(onnx_export["fp32"]["file"]).stat().st_size / 2
    assert int8.class_names == list(bundle.class_names)


def test_opset_11_export_of_the_default_model(default_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "d11.onnx"
    report = main(get_args_parser().parse_args(["--bundle", str(default_bundle), "--out", str(out), "--opset", "11"]))
    assert report["fp32"]["max_abs_diff"] < 1e-4
    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [11]


def test_torchscript_parity_and_metadata(default_bundle: Path, torch_default, tmp_path: Path) -> None:
    bundle, _ = torch_default
    out = tmp_path / "default.ts"
    report = main(
        get_args_parser().parse_args(["--bundle", str(default_bundle), "--format", "torchscript", "--out", str(out)])
    )
    assert report["fp32"]["max_abs_diff"] < 1e-4
    module, meta = load_torchscript(out)
    assert meta.class_names == bundle.class_names and meta.preprocessing == bundle.preprocessing
    batch = load_batch(PHOTOS[:3], bundle.preprocessing)
    with torch.inference_mode():
        probs = torch.softmax(module(torch.from_numpy(batch)), 1).numpy()
    assert np.abs(probs - torch_probs(torch_default, batch)).max() < 1e-4


def test_static_int8_with_calibration_and_eval_folder(tmp_path: Path) -> None:
    """A small simple_cnn bundle whose classes are folders of real photos: static int8 and its accuracy delta."""
    classes = ["cat", "coffee", "rocket"]
    prep = Preprocessing(resize=72, crop=64, mean=[0.5] * 3, std=[0.25] * 3)
    torch.manual_seed(0)
    net = build_model("simple_cnn", num_classes=3, width=8, stages=2)
    bundle_path = tmp_path / "small.pth"
    save_bundle(make_bundle(arch="simple_cnn", arch_kwargs={"width": 8, "stages": 2}, class_names=classes,
                            preprocessing=prep, state_dict=net.state_dict()), bundle_path)  # fmt: skip
    data = tmp_path / "eval"
    for cls, name in zip(classes, ("chelsea.png", "coffee.png", "china.jpg"), strict=True):
        (data / cls).mkdir(parents=True)
        shutil.copy(photo(name), data / cls / name)
    out = tmp_path / "small.onnx"
    args = ["--bundle", str(bundle_path), "--out", str(out), "--quantize", "static", "--calib", str(data)]
    report = main(get_args_parser().parse_args([*args, "--eval-data", str(data)]))
    assert report["fp32"]["max_abs_diff"] < 1e-4
    q = report["int8"]
    assert q["calibration_images"] == 3 and Path(q["file"]).name == "small.int8-static.onnx"
    ev = q["eval"]
    assert ev["delta"] == pytest.approx(ev["int8"] - ev["fp32"])
    fp32 = OnnxPredictor(out, device="cpu")
    batch = load_batch([photo("chelsea.png"), photo("coffee.png"), photo("china.jpg")], prep)
    assert ev["fp32"] == pytest.approx(float((fp32.infer(batch).argmax(1) == np.arange(3)).mean()))
    proto = onnx.load(q["file"])
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)


@pytest.mark.parametrize("script", ["bench.model", "bench.preprocess"])
def test_bench_quick_writes_json(script: str, default_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", script, "--quick", "--bundle", str(default_bundle), "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    if script == "bench.model":
        rows = result["grid"]["rows"]
        assert {r["backend"] for r in rows} == {"eager", "channels_last", "onnx"}
        assert all(r["img_s"] > 0 and r["pct_peak"] > 0 for r in rows)
        assert result["fp32_peak"]["flops"] > 0 and "| default | onnx |" in proc.stdout
        assert result["malloc_comparison"]["mallopt"]["allocator"]["mallopt"]["mmap_threshold"] is not None
    else:
        assert {r["image"] for r in result["rows"]} == {"JPEG 0.3 MP", "JPEG 3 MP", "JPEG 12 MP", "PNG 3 MP"}
        twelve = {r["draft"]: r for r in result["rows"] if r["image"] == "JPEG 12 MP"}
        assert twelve[True]["decoded_size"][0] < twelve[False]["decoded_size"][0]
        assert all(r["fraction_of_model"] > 0 for r in result["rows"])
