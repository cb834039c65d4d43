"""Release hygiene: one version (model/version.py) shown everywhere, the licence files, the changelog.

The version tests change ``model.version.__version__`` for the test and expect every place to follow:
a place that kept its own copy of the number would fail them.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from model import version as release
from model.bundle import library_versions
from tests.support.bundles import tiny_bundle
from tests.support.service import closing_app

ROOT = Path(__file__).resolve().parent.parent
TEST_VERSION = "9.8.7-test"


@pytest.fixture
def test_version(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(release, "__version__", TEST_VERSION)
    return TEST_VERSION


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("release-models")
    tiny_bundle(folder / "default.pth", ["cat", "dog"])
    with closing_app({"MODEL_DIR": str(folder), "BACKEND": "torch"}) as app:
        yield app.test_client()


def test_api_and_page_show_the_version(client, test_version, monkeypatch: pytest.MonkeyPatch):
    assert client.get("/models").get_json()["version"] == test_version
    assert client.get("/openapi.json").get_json()["info"]["version"] == test_version
    monkeypatch.delenv("IMGCLF_REVISION", raising=False)
    assert client.get("/version").get_json() == {"version": test_version, "revision": None}
    monkeypatch.setenv("IMGCLF_REVISION", "0123abc")
    assert client.get("/version").get_json() == {"version": test_version, "revision": "0123abc"}
    page = client.get("/").get_data(as_text=True)
    assert f"<span data-version>{test_version}</span>" in page


def test_version_is_semver_and_pyproject_reads_it():
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?", release.__version__)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "the version has one source: model/version.py"
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "model.version.__version__"}


def test_makefile_reads_the_same_version():
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "-n", "image"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert f"--build-arg VERSION={release.__version__} " in out
    assert f"-t imgclf:{release.__version__} " in out


def test_every_bundle_records_the_version(test_version):
    assert library_versions()["imgclf"] == test_version


def test_licence_notice_and_changelog():
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    notice = (ROOT / "NOTICE").read_text()
    for name in ("EfficientNet-Lite", "Fashion-MNIST", "chelsea.png", "china.jpg", "Tailwind"):
        assert name in notice
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, flags=re.M)
    assert released, "at least one released version, Keep a Changelog style"
    assert release.__version__ in released or "-" in release.__version__
