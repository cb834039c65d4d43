"""Where gunicorn listens: gunicorn.conf.py's bind from $PORT and $IMGCLF_HOST when no --bind is given
(Cloud Run gives only PORT), an explicit bind winning over both, and the healthcheck asking the same place."""

from __future__ import annotations

import runpy
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving.launcher import GunicornServer, free_port
from tests.support import ROOT
from tests.support.bundles import tiny_bundle

sys.path.insert(0, str(ROOT / "deploy"))
import healthcheck  # noqa: E402

CONF = ROOT / "gunicorn.conf.py"


def conf_bind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> list[str]:
    """gunicorn.conf.py's ``bind`` read with exactly ``env`` for PORT and IMGCLF_HOST."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # else the file makes a folder of its own
    for name in ("PORT", "IMGCLF_HOST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(CONF))["bind"]


@pytest.mark.parametrize(
    ("env", "bind"),
    [
        ({}, "127.0.0.1:8000"),
        ({"PORT": "9000"}, "127.0.0.1:9000"),
        ({"PORT": ""}, "127.0.0.1:8000"),
        ({"IMGCLF_HOST": "0.0.0.0"}, "0.0.0.0:8000"),  # the image, run without PORT
        ({"IMGCLF_HOST": "0.0.0.0", "PORT": "8080"}, "0.0.0.0:8080"),  # the image under Cloud Run
        ({"IMGCLF_HOST": "::", "PORT": "8080"}, "[::]:8080"),
    ],
)
def test_the_config_binds_port_and_host_and_the_healthcheck_agrees(monkeypatch, tmp_path, env, bind) -> None:
    assert conf_bind(monkeypatch, tmp_path, **env) == [bind]
    assert healthcheck.default_bind(env) == bind


@pytest.mark.parametrize("port", ["http", "0", "65536", "-1", "80 81"])
def test_a_port_that_is_not_one_stops_the_start(monkeypatch, tmp_path, port) -> None:
    with pytest.raises(ValueError, match="PORT must be a TCP port number"):
        conf_bind(monkeypatch, tmp_path, PORT=port)


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:  # noqa: S310
            return r.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bind-models")
    tiny_bundle(folder / "tiny.pth", ["a", "b"])
    return folder


def test_real_gunicorn_listens_on_port_when_no_bind_is_given(tiny_models: Path, tmp_path: Path) -> None:
    server = GunicornServer(
        tiny_models, tmp_path / "gunicorn.log", workers=1, env={"FLASK_DEFAULT_MODEL": "tiny"}, port_from_env=True
    )
    assert server.env["PORT"] == str(server.port) and "--bind" not in server.env.get("GUNICORN_CMD_ARGS", "")
    with server:
        assert answers(server.port)
        assert f"Listening at: http://127.0.0.1:{server.port} " in server.log()
        with pytest.raises(OSError):  # 127.0.0.1 only: the port is not open on the other addresses
            socket.create_connection(("127.0.0.2", server.port), timeout=2).close()  # loopback, not bound


def test_real_gunicorn_prefers_an_explicit_bind_to_port(tiny_models: Path, tmp_path: Path) -> None:
    ignored = free_port()
    server = GunicornServer(
        tiny_models, tmp_path / "gunicorn.log", workers=1, env={"FLASK_DEFAULT_MODEL": "tiny", "PORT": str(ignored)}
    )
    assert "--bind 127.0.0.1:" in server.env["GUNICORN_CMD_ARGS"] and server.env["PORT"] == str(ignored)
    with server:
        assert answers(server.port) and not answers(ignored)
        assert f"Listening at: http://127.0.0.1:{server.port} " in server.log()


def test_make_run_hands_host_and_port_to_gunicorn() -> None:
    done = subprocess.run(
        ["make", "-n", "run", "PORT=9000", "HOST=0.0.0.0"], cwd=ROOT, capture_output=True, text=True, check=True
    )  # fmt: skip
    command = 'IMGCLF_HOST=0.0.0.0 PORT=9000 .venv/bin/gunicorn --config gunicorn.conf.py "app:create_app()"'
    assert command in done.stdout
