"""The ONNX Runtime backend of the service, its export files, and the service benchmarks' --quick runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app import create_app
from model.export_metadata import SHA_KEY
from model.files import file_sha256
from model.onnx_runner import read_onnx_metadata
from serving.config import ConfigError
from serving.launcher import GunicornServer
from tests.support.bundles import tiny_bundle
from tests.support.photos import CAT_LABELS, top_label
from tests.support.service import closing_app

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("chelsea", "coffee", "astronaut", "china", "flower")
TINY_CLASSES = ["ash", "birch", "cedar"]


@pytest.fixture(scope="module")
def model_dir(make_model_folder) -> Path:
    return make_model_folder("perf-models")


@pytest.fixture(scope="module")
def apps(model_dir: Path):
    with (
        closing_app({"MODEL_DIR": str(model_dir), "BACKEND": "onnx"}) as onnx,
        closing_app({"MODEL_DIR": str(model_dir), "BACKEND": "torch"}) as eager,
    ):
        yield {"onnx": onnx, "torch": eager}


def ask(app, data: bytes, top_k: int = 5) -> dict:
    r = app.test_client().post(f"/predict?top_k={top_k}", data=data, content_type="image/png")
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_onnx_is_the_default_backend_and_says_so(apps, model_dir: Path) -> None:
    described = apps["onnx"].test_client().get("/models").get_json()["models"][0]
    assert described["backend"] == "onnx" and described["providers"] == ["CPUExecutionProvider"]
    assert apps["torch"].test_client().get("/models").get_json()["models"][0]["backend"] == "torch"
    default = create_app({"MODEL_DIR": str(model_dir)})
    try:
        assert default.test_client().get("/models").get_json()["models"][0]["backend"] == "onnx"
    finally:
        default.extensions["imgclf.models"].close()


@pytest.mark.parametrize("name", PHOTOS)
def test_onnx_answers_equal_torch(apps, photos, name: str) -> None:
    data = photos[name].read_bytes()
    onnx_body, torch_body = ask(apps["onnx"], data), ask(apps["torch"], data)
    assert [p["label"] for p in onnx_body["predictions"]] == [p["label"] for p in torch_body["predictions"]]
    for a, b in zip(onnx_body["predictions"], torch_body["predictions"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    if name == "chelsea":
        assert top_label(onnx_body) in CAT_LABELS


def test_onnx_export_is_made_at_start_and_redone_when_the_bundle_changes(tmp_path: Path, photos) -> None:
    bundle = tiny_bundle(tmp_path / "tiny.pth", TINY_CLASSES, seed=1)
    config = {"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "tiny", "BACKEND": "onnx"}
    first = create_app(config)
    exported = tmp_path / "tiny.onnx"
    assert read_onnx_metadata(exported)[SHA_KEY] == file_sha256(bundle)
    before = ask(first, photos["coffee"].read_bytes(), top_k=3)
    first.extensions["imgclf.models"].close()

    tiny_bundle(bundle, TINY_CLASSES, seed=2)  # retrained: same name, other weights
    second = create_app(config)
    assert read_onnx_metadata(exported)[SHA_KEY] == file_sha256(bundle)
    after = ask(second, photos["coffee"].read_bytes(), top_k=3)
    torch_app = create_app({**config, "BACKEND": "torch"})
    expected = ask(torch_app, photos["coffee"].read_bytes(), top_k=3)
    assert [p["score"] for p in after["predictions"]] == pytest.approx(
        [p["score"] for p in expected["predictions"]], abs=1e-4
    )
    assert [p["score"] for p in after["predictions"]] != [p["score"] for p in before["predictions"]]
    for app in (second, torch_app):
        app.extensions["imgclf.models"].close()


def test_corrupt_export_is_replaced_and_onnx_dir_is_honoured(tmp_path: Path) -> None:
    models, exports = tmp_path / "models", tmp_path / "exports"
    models.mkdir()
    tiny_bundle(models / "tiny.pth", TINY_CLASSES)
    exports.mkdir()
    (exports / "tiny.onnx").write_bytes(b"not an onnx file")
    app = create_app({"MODEL_DIR": str(models), "DEFAULT_MODEL": "tiny", "ONNX_DIR": str(exports)})
    assert not (models / "tiny.onnx").exists()
    assert read_onnx_metadata(exports / "tiny.onnx")[SHA_KEY] == file_sha256(models / "tiny.pth")
    app.extensions["imgclf.models"].close()


def test_unknown_backend_refuses_to_start(tmp_path: Path) -> None:
    tiny_bundle(tmp_path / "tiny.pth", TINY_CLASSES)
    with pytest.raises(ConfigError, match="BACKEND"):
        create_app({"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "tiny", "BACKEND": "tensorrt"})


def test_onnx_backend_under_real_gunicorn(model_dir: Path, apps, photos, tmp_path: Path) -> None:
    import requests

    server = GunicornServer(model_dir, tmp_path / "gunicorn.log", workers=1, threads=4, env={"FLASK_BACKEND": "onnx"})
    server.start()
    try:
        with open(photos["chelsea"], "rb") as f:
            r = requests.post(server.url("/predict?top_k=5"), files={"file": ("chelsea.png", f)}, timeout=30)
        assert r.status_code == 200 and top_label(r.json()) in CAT_LABELS
        expected = ask(apps["torch"], photos["chelsea"].read_bytes())
        assert [p["score"] for p in r.json()["predictions"]] == pytest.approx(
            [p["score"] for p in expected["predictions"]], abs=1e-4
        )
        assert requests.get(server.url("/models"), timeout=10).json()["models"][0]["backend"] == "onnx"
    finally:
        assert server.stop() == 0


def run_bench(module: str, *args: str, timeout: float = 240) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_serve_quick_writes_json(default_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    stdout = run_bench(
        "bench.serve", "--bundle", str(default_bundle), "--concurrency", "1,4", "--json", str(out), timeout=480
    )
    result = json.loads(out.read_text())
    assert set(result["workloads"]) == {"small", "phone"}
    for workload in result["workloads"].values():
        assert set(workload["load"]) == {"service", "naive"}
        for per in workload["load"].values():
            for cell in per.values():
                assert cell["errors"] == 0 and cell["req_s"] > 0
                assert 0 < cell["p50_ms"] <= cell["p95_ms"] <= cell["p99_ms"]
    phone = result["workloads"]["phone"]["photos"]
    assert all(p["bytes"] > 1_500_000 and sorted(p["size"]) == [3000, 4000] for p in phone)
    assert any(p["orientation"] in (3, 6, 8) for p in phone)
    for name in ("small", "phone"):
        ratios = result["ratios"][name]["service"]
        assert {"over_naive_c4", "over_limit_c4", "p50_c1_over_model_batch1"} <= set(ratios)
        limit = result["limit"]["workloads"][name]
        assert 0 < limit["limit_img_s"] < min(limit["decode_img_s"], result["limit"]["model_img_s"])
    for memory in result["memory_mib"].values():  # gunicorn's master and its worker, both counted
        assert memory["idle"]["processes"] >= 2 and 0 < memory["idle"]["pss_mib"]
        assert memory["after_load"]["pss_mib"] > 0
    assert len(result["loadavg_before_after"]) == 2 and "| service | 4 |" in stdout


def test_bench_cold_start_quick_writes_json(default_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "cold.json"
    run_bench("bench.cold_start", "--bundle", str(default_bundle), "--backends", "onnx", "--json", str(out))
    median = json.loads(out.read_text())["median"]["onnx"]
    assert 0 < median["model_load_warmup_s"] < median["total_s"]
    assert median["imports_s"] > 0 and "after_imports_s" in median
