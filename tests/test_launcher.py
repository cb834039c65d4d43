"""serving/launcher.py, the one gunicorn launcher of tests/ and bench/: what it hands gunicorn.

Starting and stopping the real service through it is what tests/test_service_gunicorn.py,
test_faults.py, test_hostile_corpus.py and test_page.py do."""

from __future__ import annotations

import os

from serving.launcher import REPO, SERVICE_APP, GunicornServer, clean_env


def test_it_starts_the_service_as_make_run_does_with_the_operators_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASK_API_KEY", "from-the-callers-shell")  # never leaks into the child
    monkeypatch.setenv("WEB_CONCURRENCY", "7")
    server = GunicornServer(tmp_path, tmp_path / "g.log", workers=2, threads=3, env={"FLASK_BACKEND": "torch"})
    assert server.args == ["--config", "gunicorn.conf.py", SERVICE_APP]
    env = server.env
    assert env["FLASK_MODEL_DIR"] == str(tmp_path) and env["FLASK_BACKEND"] == "torch"
    assert (env["WEB_CONCURRENCY"], env["GUNICORN_THREADS"]) == ("2", "3")
    assert env["GUNICORN_CMD_ARGS"] == f"--bind 127.0.0.1:{server.port}"
    assert "FLASK_API_KEY" not in env
    assert server.url("/readyz") == f"http://127.0.0.1:{server.port}/readyz"


def test_unset_sizes_are_the_config_files_and_the_callers_gunicorn_args_keep_the_bind(tmp_path, monkeypatch):
    monkeypatch.setenv("GUNICORN_THREADS", "99")
    server = GunicornServer(None, tmp_path / "g.log", env={"GUNICORN_CMD_ARGS": "--timeout 5"})
    assert "WEB_CONCURRENCY" not in server.env and "GUNICORN_THREADS" not in server.env
    assert "FLASK_MODEL_DIR" not in server.env
    assert server.env["GUNICORN_CMD_ARGS"] == f"--timeout 5 --bind 127.0.0.1:{server.port}"


def test_other_apps_run_under_gunicorn_defaults(tmp_path):
    naive = GunicornServer(None, tmp_path / "n.log", app="pkg.mod:app", config=None, args=["-w", "1"], name="naive")
    assert naive.args == ["-w", "1", "pkg.mod:app"] and naive.name == "naive"
    assert clean_env()["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)  # the repository's packages import
