"""Draining under real gunicorn: on SIGTERM readiness turns 503 at once, and the requests already in
flight (one in its forward pass, two queued behind it in the batcher) are still answered."""

from __future__ import annotations

import http.client
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from serving.launcher import GunicornServer
from tests.support.bundles import tiny_bundle
from tests.support.slow_app import FORWARD_PASS_STARTED, SLOW_APP

CLASSES = ["cirrus", "cumulus", "nimbus"]


def wait_for_log(server: GunicornServer, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_turns_readiness_503_and_finishes_the_requests_in_flight(tmp_path: Path, photos) -> None:
    tiny_bundle(tmp_path / "clouds.pth", CLASSES)
    server = GunicornServer(
        tmp_path,
        tmp_path / "gunicorn.log",
        workers=1,  # and gunicorn.conf.py's 8 request threads: 6 admitted, more than the 3 requests here
        app=SLOW_APP,
        env={"FLASK_DEFAULT_MODEL": "clouds", "IMGCLF_TEST_INFER_DELAY_S": "2"},
    ).start()
    assert server.proc is not None
    chelsea = photos["chelsea"].read_bytes()
    try:
        with ThreadPoolExecutor(3) as pool:
            answers = [
                pool.submit(requests.post, server.url("/predict"), files={"file": ("c.png", chelsea)}, timeout=60)
                for _ in range(3)
            ]
            assert wait_for_log(server, FORWARD_PASS_STARTED, 30), server.log()[-3000:]
            time.sleep(0.2)  # the other two reach the batcher's queue (their images are tiny to decode)
            # a load balancer's kept-alive connection, ready before the signal
            balancer = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            balancer.request("GET", "/readyz")
            before = balancer.getresponse()
            assert before.status == 200 and not before.will_close
            before.read()
            assert not any(answer.done() for answer in answers)

            server.proc.send_signal(signal.SIGTERM)
            assert wait_for_log(server, "Handling signal: term", 10)
            time.sleep(0.3)  # the master has passed SIGTERM on to the worker
            balancer.request("GET", "/readyz")
            after = balancer.getresponse()
            body = after.read()
            assert after.status == 503, body
            assert b'"not_ready"' in body and after.will_close  # answered, then the connection closes
            results = [answer.result() for answer in answers]
        for r in results:
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "clouds" and r.json()["predictions"][0]["label"] in CLASSES
        assert server.proc.wait(60) == 0
        log = server.log()
        assert "draining: /readyz answers 503 from now on" in log
        assert "Traceback" not in log and "Shutting down: Master" in log
    finally:
        server.stop()
