"""CI's soak: bench/soak.py --quick (300 mixed valid and hostile requests, 16 clients) must see no
unexpected status, no worker death and no traceback. Speed and memory figures are the full run's job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_soak_has_no_unexpected_status(tmp_path: Path, default_bundle: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--model", str(default_bundle), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["requests"] == 300
    assert report["unexpected"] == 0, report["unexpected_examples"]
    assert report["worker_pids_unchanged"] and report["tracebacks_in_log"] == 0
    assert done.returncode == 0, done.stdout + done.stderr
