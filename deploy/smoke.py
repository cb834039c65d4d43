"""Smoke test of a running container (what CI runs through ../shared/tools/docker-check).

Asks the service on 127.0.0.1:$PORT for /healthz and /readyz, classifies scikit-image's chelsea.png
(a photo of a cat, taken from the installed scikit-image) through POST /predict, checks /metrics, and,
when the repository has a static/ folder, that its files (the compiled CSS) are served from the image.
Prints what it got; exits 1 on the first failed check.

    PORT=18080 .venv/bin/python deploy/smoke.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import requests

CATS = {"tabby", "tiger cat", "Egyptian cat"}
REPO = Path(__file__).resolve().parent.parent


class SmokeFailure(Exception):
    pass


def chelsea_png() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / "chelsea.png"


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def wait_ready(base: str, timeout: float) -> requests.Response:
    """/readyz turns 200 once the models are loaded and warm; poll it for a bounded time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = requests.get(f"{base}/readyz", timeout=5)
            if response.status_code == 200 or time.monotonic() > deadline:
                return response
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def run(base: str, image: Path, ready_timeout: float, expect_model: str | None = None) -> None:
    health = requests.get(f"{base}/healthz", timeout=5)
    print(f"GET /healthz -> {health.status_code} {health.text.strip()}")
    check(health.status_code == 200, "/healthz is not 200")

    ready = wait_ready(base, ready_timeout)
    print(f"GET /readyz -> {ready.status_code} {ready.text.strip()}")
    check(ready.status_code == 200, "/readyz is not 200")

    started = time.perf_counter()
    with image.open("rb") as f:
        response = requests.post(f"{base}/predict", files={"file": (image.name, f, "image/png")}, timeout=60)
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"POST /predict {image.name} -> {response.status_code} in {elapsed_ms:.0f} ms")
    print(json.dumps(response.json(), indent=2))
    check(response.status_code == 200, "/predict is not 200")
    top = response.json()["predictions"][0]["label"]
    if expect_model is not None:
        check(
            response.json()["model"] == expect_model, f"answered by {response.json()['model']!r}, not {expect_model!r}"
        )
    check(top in CATS, f"top answer for chelsea.png is {top!r}, not a cat ({', '.join(sorted(CATS))})")

    metrics = requests.get(f"{base}/metrics", timeout=5)
    samples = [line for line in metrics.text.splitlines() if line.startswith("imgclf_images_total")]
    print(f"GET /metrics -> {metrics.status_code}; {'; '.join(samples)}")
    check(metrics.status_code == 200 and samples, "/metrics does not count the classified image")

    static = REPO / "static"
    files = sorted(p for p in static.rglob("*") if p.is_file()) if static.is_dir() else []
    for path in files:
        url = f"{base}/static/{path.relative_to(static).as_posix()}"
        got = requests.get(url, timeout=5)
        print(f"GET {url.removeprefix(base)} -> {got.status_code}, {len(got.content)} bytes")
        check(got.status_code == 200 and len(got.content) > 0, f"{url} is not served from the image")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Smoke-test the service running on 127.0.0.1.")
    p.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "8000")), help="port (default: $PORT, else 8000)"
    )
    p.add_argument("--image", type=Path, default=None, help="photo of a cat to post (default: skimage's chelsea.png)")
    p.add_argument("--expect-model", default=None, help="model that must answer (default: any)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for /readyz (default: 120)")
    return p


def main(args: argparse.Namespace) -> int:
    base = f"http://127.0.0.1:{args.port}"
    try:
        run(base, args.image or chelsea_png(), args.ready_timeout, args.expect_model)
    except (SmokeFailure, requests.RequestException, KeyError, IndexError, ValueError) as exc:
        print(f"SMOKE TEST FAILED: {exc}", file=sys.stderr)
        return 1
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
