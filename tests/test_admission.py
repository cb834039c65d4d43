"""Admission control: a worker decodes and infers at most MAX_INFLIGHT requests at once; the rest get an
immediate 503 busy with Retry-After, counted in /metrics, while the request threads left over keep
answering /healthz, /readyz and /metrics within a second. Against real gunicorn with a real (slowed) model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from serving.admission import RETRY_AFTER_S, Admission
from serving.config import ConfigError, admission_limit, admission_waiting_room, check_config, request_threads
from serving.launcher import GunicornServer
from tests.support.bundles import tiny_bundle
from tests.support.service import closing_app, metric_samples
from tests.support.slow_app import SLOW_APP

CLASSES = ["cirrus", "cumulus", "nimbus"]
THREADS = 4
PROBES = ("/healthz", "/readyz", "/metrics")


@pytest.mark.parametrize(
    ("setting", "threads", "model_threads", "limit"),
    [
        (0, 16, 2, 6),
        (0, 8, 2, 6),
        (0, 4, 2, 2),
        (0, 3, 2, 1),
        (0, 1, 2, 1),
        (0, 24, 1, 3),  # a worker per CPU: one in the model, two decoding beside it
        (0, 24, 4, 6),
        (5, 8, 1, 5),
        (8, 8, 1, 8),
        (0, None, 1, None),
        (3, None, 1, 3),
    ],
)
def test_the_default_limit_follows_the_model_threads_and_leaves_two_for_probes(
    setting, threads, model_threads, limit
) -> None:
    assert admission_limit({"MAX_INFLIGHT": setting, "TORCH_THREADS": model_threads}, threads) == limit


@pytest.mark.parametrize(
    ("limit", "threads", "room"), [(6, 16, 8), (6, 8, 0), (2, 4, 0), (8, 8, 0), (4, 12, 6), (None, 8, 0), (3, None, 0)]
)
def test_the_threads_beyond_the_admitted_and_the_probes_are_the_waiting_room(limit, threads, room) -> None:
    assert admission_waiting_room(limit, threads) == room


def test_a_request_waits_for_a_slot_in_the_room_and_is_refused_when_the_room_is_full() -> None:
    gate = Admission(1, waiting=1, wait_s=2.0)
    assert gate.try_enter()  # the one slot
    waited: list[bool] = []
    waiter = threading.Thread(target=lambda: waited.append(gate.try_enter()))
    waiter.start()
    deadline = time.monotonic() + 2
    while gate._waiters == 0 and time.monotonic() < deadline:  # the waiter is in the room
        time.sleep(0.01)
    started = time.perf_counter()
    assert not gate.try_enter()  # the room is full: refused at once, no waiting
    assert time.perf_counter() - started < 0.05
    gate.leave()  # the slot frees up: the waiter takes it
    waiter.join(timeout=5)
    assert waited == [True]
    gate.leave()


def test_a_wait_in_the_room_ends_in_a_refusal_after_the_admission_wait() -> None:
    gate = Admission(1, waiting=4, wait_s=0.2)
    assert gate.try_enter()
    started = time.perf_counter()
    assert not gate.try_enter()
    assert 0.15 < time.perf_counter() - started < 2
    assert Admission(1, waiting=4, wait_s=0).waiting == 0  # no wait: no room


def test_request_threads_come_from_the_worker_environment() -> None:
    assert request_threads({"IMGCLF_REQUEST_THREADS": "12"}) == 12
    assert request_threads({}) is None
    assert request_threads({"IMGCLF_REQUEST_THREADS": "0"}) is None


@pytest.mark.parametrize("bad", [-1, "six", 2.5, True])
def test_a_bad_limit_stops_the_start(bad) -> None:
    from serving.config import DEFAULTS

    with pytest.raises(ConfigError, match="MAX_INFLIGHT"):
        check_config({**DEFAULTS, "MAX_INFLIGHT": bad})


def test_slots_are_taken_without_waiting_and_given_back() -> None:
    gate = Admission(2)
    assert gate.try_enter() and gate.try_enter()
    started = time.perf_counter()
    assert not gate.try_enter()
    assert time.perf_counter() - started < 0.05
    gate.leave()
    assert gate.try_enter()
    assert Admission(None).try_enter()
    with pytest.raises(ValueError):
        Admission(0)


def test_the_page_keeps_retry_after_on_its_busy_page(tmp_path: Path, photos) -> None:
    """No free slot: the page's form post is refused before its body is read, with the page's message."""
    tiny_bundle(tmp_path / "clouds.pth", CLASSES)
    with closing_app({"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "clouds", "MAX_INFLIGHT": 1}) as app:
        gate = app.extensions["imgclf.admission"]
        assert gate.limit == 1 and gate.try_enter()  # the one slot is taken
        client = app.test_client()
        page = client.post("/", data={"file": (photos["chelsea"].open("rb"), "c.png")})
        api = client.post("/predict", data=photos["chelsea"].read_bytes(), content_type="image/png")
        gate.leave()
        assert page.status_code == 503 and page.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert "The server is busy" in page.get_data(as_text=True)
        assert api.status_code == 503 and api.json["error"]["code"] == "busy"
        assert api.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert client.post("/predict", data=photos["chelsea"].read_bytes(), content_type="image/png").status_code == 200
        rejected = metric_samples(client.get("/metrics").get_data(as_text=True), "imgclf_rejected_requests_total")
        assert rejected == {'{endpoint="/"}': 1.0, '{endpoint="/predict"}': 1.0}


class Prober(threading.Thread):
    """GET each probe path in turn on a new connection, 1 s timeout, until stopped: (path, status, seconds)."""

    def __init__(self, server: GunicornServer) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.samples: list[tuple[str, int | str, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for path in PROBES:
                started = time.perf_counter()
                try:
                    status: int | str = requests.get(self.server.url(path), timeout=1).status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                self.samples.append((path, status, time.perf_counter() - started))
            self.stopping.wait(0.05)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory):
    """One worker of 4 request threads (so 2 admitted), each forward pass 1.5 s longer than it takes."""
    folder = tmp_path_factory.mktemp("admission-models")
    tiny_bundle(folder / "clouds.pth", CLASSES)
    server = GunicornServer(
        folder,
        tmp_path_factory.mktemp("admission-logs") / "gunicorn.log",
        workers=1,
        threads=THREADS,
        app=SLOW_APP,
        env={"FLASK_DEFAULT_MODEL": "clouds", "IMGCLF_TEST_INFER_DELAY_S": "1.5"},
    ).start()
    yield server
    server.stop()


def test_overload_is_shed_with_503_busy_while_probes_answer_within_a_second(slow_server, photos) -> None:
    chelsea = photos["chelsea"].read_bytes()
    before = metric_samples(requests.get(slow_server.url("/metrics"), timeout=5).text, "imgclf_rejected_requests_total")

    def ask(i: int) -> requests.Response:
        if i % 4 == 3:  # the page's no-JavaScript form post goes through the same gate
            return requests.post(slow_server.url("/"), files={"file": ("c.png", chelsea)}, timeout=60)
        return requests.post(slow_server.url("/predict"), files={"file": ("c.png", chelsea)}, timeout=60)

    prober = Prober(slow_server)
    prober.start()
    try:
        with ThreadPoolExecutor(3 * THREADS) as pool:
            answers = list(pool.map(ask, range(3 * THREADS)))
        time.sleep(0.3)  # a few probes more once the last answer is out
    finally:
        prober.stopping.set()
        prober.join()

    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, [r.text[:200] for r in answers]
    busy = [r for r in answers if r.status_code == 503]
    assert busy and statuses.count(200) >= 2, statuses
    for r in busy:
        assert r.headers["Retry-After"] == str(RETRY_AFTER_S)
        if r.request.url.endswith("/predict"):
            assert r.json()["error"]["code"] == "busy"
        else:
            assert "The server is busy" in r.text
    for r in answers:
        if r.status_code == 200 and r.request.url.endswith("/predict"):
            assert r.json()["predictions"][0]["label"] in CLASSES

    assert len(prober.samples) >= 2 * len(PROBES)
    slow = [s for s in prober.samples if s[1] != 200 or s[2] >= 1.0]
    assert not slow, slow
    after = metric_samples(requests.get(slow_server.url("/metrics"), timeout=5).text, "imgclf_rejected_requests_total")
    for endpoint, path in (("/predict", "/predict"), ("/", "/")):
        key = f'{{endpoint="{endpoint}"}}'
        refused = sum(1 for r in busy if r.request.path_url == path)
        assert after.get(key, 0) - before.get(key, 0) == refused
    log = slow_server.log()
    assert "Traceback" not in log and "Worker exiting" not in log
