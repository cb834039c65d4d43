"""Faults: a worker killed under load, the master stopped mid-request, bundles that must not be served,
and training killed with SIGKILL mid-epoch and mid-checkpoint-write."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from model.bundle import Bundle, load_bundle, read_bundle
from serving.launcher import GunicornServer, worker_pids
from tests.support.bundles import tiny_bundle
from tests.support.photos import CAT_LABELS, top_label
from tests.support.service import logs_of_failed_starts

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def model_dir(make_model_folder) -> Path:
    return make_model_folder("fault-models")


def test_sigkill_a_worker_under_load(model_dir: Path, tmp_path: Path, photos) -> None:
    chelsea = photos["chelsea"].read_bytes()
    # as many admission slots as request threads: only the worker's death may fail a request here
    srv = GunicornServer(
        model_dir, tmp_path / "gunicorn.log", workers=2, threads=4, env={"FLASK_MAX_INFLIGHT": "4"}
    ).start()
    try:
        assert srv.proc is not None
        before = worker_pids(srv.proc.pid)
        assert len(before) == 2
        results: list[tuple[float, float, bool]] = []  # (start, end, ok)
        lock = threading.Lock()
        stop_at = time.monotonic() + 8.0

        def client() -> None:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    r = requests.post(srv.url("/predict"), files={"file": ("c.png", chelsea)},
                                      headers={"Connection": "close"}, timeout=30)  # fmt: skip
                    ok = r.status_code == 200 and top_label(r.json()) in CAT_LABELS
                except requests.RequestException:
                    ok = False
                with lock:
                    results.append((started, time.monotonic(), ok))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        victim = min(before)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(60)
        failed = [(s, e) for s, e, ok in results if not ok]
        # only requests already in flight when the worker died fail
        assert all(s < killed_at <= e for s, e in failed), (failed, killed_at)
        assert len(failed) <= 8
        answered_after = [e - killed_at for s, e, ok in results if ok and s >= killed_at]
        assert answered_after and min(answered_after) < 5.0  # the service answers again within 5 s
        assert all(ok for s, e, ok in results if s >= killed_at)
        # gunicorn replaces the worker: a new PID, and the survivor untouched
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = worker_pids(srv.proc.pid)
            if len(now) == 2 and victim not in now and "Booting worker" in srv.log().split("SIGKILL")[-1]:
                break
            time.sleep(0.5)
        now = worker_pids(srv.proc.pid)
        assert victim not in now and len(now) == 2 and (before - {victim}) <= now, (before, now)
        r = requests.post(srv.url("/predict"), files={"file": ("c.png", chelsea)}, timeout=30)
        assert r.status_code == 200 and top_label(r.json()) in CAT_LABELS
    finally:
        srv.stop()


def test_sigterm_to_master_finishes_in_flight_requests(model_dir: Path, tmp_path: Path, photos) -> None:
    chelsea = photos["chelsea"].read_bytes()
    srv = GunicornServer(model_dir, tmp_path / "gunicorn.log", workers=1, threads=8).start()
    assert srv.proc is not None
    half = len(chelsea) // 2
    sockets = []
    try:
        # three uploads caught half-way: the request has started, its body is not all there yet
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nConnection: close\r\n"
                + f"Content-Length: {len(chelsea)}\r\n\r\n".encode()
                + chelsea[:half]
            )
            sockets.append(s)
        with ThreadPoolExecutor(3) as pool:
            full = [
                pool.submit(requests.post, srv.url("/predict"), files={"file": ("c.png", chelsea)}, timeout=60)
                for _ in range(3)
            ]
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            for s in sockets:
                s.sendall(chelsea[half:])
            answers = [f.result() for f in full]
        for r in answers:
            assert r.status_code == 200 and top_label(r.json()) in CAT_LABELS
        for s in sockets:
            raw = s.makefile("rb").read()
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), raw[:300]
            assert top_label(json.loads(body)) in CAT_LABELS
        assert srv.proc.wait(60) == 0
        log = srv.log()
        assert "Shutting down: Master" in log and "Traceback" not in log
    finally:
        for s in sockets:
            s.close()
        srv.stop()


class _RunsCode:
    """Unpickling this runs a shell command (how a malicious .pth would take over a server)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_bundles(folder: Path, default_bundle: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model folder, what the log must say). Each folder also has the good default model;
    the bad file sorts first, so the start stops before loading it."""
    made = {}

    def folder_for(name: str) -> Path:
        d = folder / name
        d.mkdir()
        (d / "default.pth").symlink_to(default_bundle)
        return d

    d = folder_for("truncated")
    (d / "a_truncated.pth").write_bytes(default_bundle.read_bytes()[:300_000])
    made["truncated"] = (d, "a_truncated.pth: not a readable torch file (truncated or corrupt)")
    d = folder_for("not_a_bundle")
    torch.save({"weights": torch.zeros(3)}, d / "a_weights.pth")
    made["not_a_bundle"] = (d, "a_weights.pth: not a model bundle")
    d = folder_for("pickle")
    bundle = read_bundle(default_bundle).to_dict()
    bundle["training"] = {"note": _RunsCode(folder / "pwned")}
    torch.save(bundle, d / "a_evil.pth")
    made["pickle"] = (d, "a_evil.pth: refused: it holds pickled Python objects")
    d = folder_for("mismatch")
    tiny = read_bundle(tiny_bundle(folder / "tiny.pth", ["a", "b", "c"])).to_dict()
    tiny["class_names"] = ["a", "b", "c", "d", "e"]
    torch.save(tiny, d / "a_mismatch.pth")
    made["mismatch"] = (d, "a_mismatch.pth: class count mismatch: 5 class names but the head")
    return made


def test_bad_bundles_stop_the_server_with_a_clear_message(tmp_path: Path, default_bundle: Path) -> None:
    bad = _bad_bundles(tmp_path, default_bundle)
    servers = {name: GunicornServer(d, tmp_path / f"{name}.log") for name, (d, _) in bad.items()}
    for name, log in logs_of_failed_starts(servers).items():  # four starts at once
        assert bad[name][1] in log, (name, log[-2000:])
        assert "not starting: the settings or the models cannot be served" in log  # before any worker forks
    assert not (tmp_path / "pwned").exists(), "unpickling ran the payload"
    # the payload is real: loading the same file without weights_only runs it
    evil = bad["pickle"][0] / "a_evil.pth"
    unsafe_load = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe_load], cwd=tmp_path, check=True, timeout=120)
    assert (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def train_data(two_class_images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("kill-data")
    for name, files in two_class_images.items():
        (data / name).mkdir()
        for i, f in enumerate(files):
            shutil.copy(f, data / name / f"{i:03d}.png")
    return data


def train_args(data: Path, out: Path) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--epochs", "3", "--batch-size", "16", "--quiet",
            "--workers", "0", "--deterministic", "--seed", "7", "--threads", "1"]  # fmt: skip


def run_training(args: list[str], kill: str | None = None) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, str(ROOT / "tests" / "kill_train.py"), kill, "--", *args] if kill else [
        sys.executable, "-m", "training.train", *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run_training(train_args(train_data, out))
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return read_bundle(out / "last.pth")


def _assert_same_weights(a: Bundle, b: Bundle) -> None:
    assert a.state_dict.keys() == b.state_dict.keys()
    for key, value in a.state_dict.items():
        assert torch.equal(value, b.state_dict[key]), key


@pytest.mark.parametrize(
    "kill, leftover",
    [("epoch:2:2", False), ("write:last.pth:2", True)],
    ids=["during-epoch-2", "during-last.pth-write-of-epoch-2"],
)
def test_training_killed_then_resumed(train_data: Path, tmp_path: Path, uninterrupted: Bundle, kill, leftover) -> None:
    out = tmp_path / "run"
    killed = run_training(train_args(train_data, out), kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    # what the crash left: epoch 1's checkpoints, loadable; the half-written file only as a temporary
    last, _ = load_bundle(out / "last.pth")
    assert last.training["epoch"] == 1
    assert torch.load(out / "last.pth", weights_only=True)["resume"]["epoch"] == 1
    best, _ = load_bundle(out / "best.pth")
    assert best.training["epoch"] in (1, 2)
    temporaries = list(out.glob(".last.pth.*.tmp"))
    assert bool(temporaries) == leftover, temporaries
    if leftover:
        assert 0 < temporaries[0].stat().st_size < (out / "last.pth").stat().st_size
    resumed = run_training([*train_args(train_data, out), "--resume", str(out / "last.pth")])
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    final = read_bundle(out / "last.pth")
    assert final.training["epoch"] == 3
    _assert_same_weights(uninterrupted, final)
    assert [h["val_loss"] for h in final.training["history"]] == [
        h["val_loss"] for h in uninterrupted.training["history"]
    ]
    load_bundle(out / "best.pth")
