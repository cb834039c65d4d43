"""model.files: the one atomic write (bundles, ONNX, TorchScript) and the one cross-process file lock."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from model.files import atomic_write, file_lock, file_sha256


def test_atomic_write_replaces_the_file_with_a_plain_files_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.bin"
    atomic_write(path, lambda f: f.write(b"old"))
    old_umask = os.umask(0o027)
    try:
        assert atomic_write(path, lambda f: f.write(b"new")) == path
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, not mkstemp's 0o600
    assert [p.name for p in path.parent.iterdir()] == ["x.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail_halfway(f) -> None:
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail_halfway)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def _hold(lock: str, marker: str, seconds: float) -> None:
    with file_lock(lock):
        Path(marker).write_text(str(time.monotonic()))
        time.sleep(seconds)


def test_file_lock_excludes_another_process(tmp_path: Path) -> None:
    lock, marker = tmp_path / "locks" / ".x.lock", tmp_path / "held"
    other = multiprocessing.get_context("spawn").Process(target=_hold, args=(str(lock), str(marker), 1.0))
    other.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline and other.is_alive(), "the other process never took the lock"
        time.sleep(0.01)
    with file_lock(lock):
        waited_until = time.monotonic()
    other.join(30)
    assert waited_until - float(marker.read_text()) >= 0.9, "the lock was taken while another process held it"


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
