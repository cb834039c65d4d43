"""The hostile-input corpus (tests/support/hostile.py) against one real gunicorn, plus slow and lingering clients.

After every case the same worker processes must still be there and still call chelsea.png a cat: no
input kills, restarts or poisons a worker. A second server checks the API key.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from serving.launcher import GunicornServer, worker_pids
from tests.support.hostile import Case, build_cases, upload
from tests.support.photos import CAT_LABELS, top_label

ROOT = Path(__file__).resolve().parent.parent
READ_TIMEOUT = 2.0  # GUNICORN_READ_TIMEOUT of the corpus server: slow clients are cut after this
THREADS = 4


def _photo_paths() -> dict[str, Path]:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return {"chelsea": data / "chelsea.png", "coffee": data / "coffee.png"}


CASES = build_cases(_photo_paths())


def send(server: GunicornServer, case: Case) -> requests.Response:
    return requests.request(case.method, server.url(case.path), timeout=60, **case.request_kwargs())


def assert_security_headers(r: requests.Response) -> None:
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    csp = r.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp


def chelsea_is_a_cat(server: GunicornServer) -> None:
    chelsea = _photo_paths()["chelsea"].read_bytes()
    r = requests.post(server.url("/predict"), files={"file": ("chelsea.png", chelsea)}, timeout=60)
    assert r.status_code == 200 and top_label(r.json()) in CAT_LABELS, r.text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, make_model_folder):
    folder = make_model_folder("corpus-models")
    srv = GunicornServer(
        folder,
        tmp_path_factory.mktemp("corpus-logs") / "gunicorn.log",
        workers=1,
        threads=THREADS,
        env={"GUNICORN_READ_TIMEOUT": str(READ_TIMEOUT)},
    )
    srv.start()
    assert srv.proc is not None
    srv.workers = worker_pids(srv.proc.pid)  # type: ignore[attr-defined]
    assert len(srv.workers) == 1  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_case(server: GunicornServer, case: Case) -> None:
    r = send(server, case)
    assert r.status_code == case.status, r.text[:500]
    assert r.headers["Content-Type"] == "application/json"
    assert_security_headers(r)
    body = r.json()
    assert "Traceback" not in r.text
    if case.code is not None:
        assert set(body) == {"error"} and body["error"]["code"] == case.code, body
        assert body["error"]["message"]
    else:
        if case.cat:
            assert top_label(body) in CAT_LABELS, body
        if case.check is not None:
            case.check(body)
        if case.same_as is not None:
            reference = requests.post(server.url("/predict"), timeout=60, **case.same_as).json()
            if case.same == "labels":
                assert {p["label"] for p in body["predictions"]} == {p["label"] for p in reference["predictions"]}
            else:
                assert body["predictions"] == reference["predictions"]
    assert worker_pids(server.proc.pid) == server.workers  # same workers: none died or was replaced
    chelsea_is_a_cat(server)


def test_client_that_stops_mid_body(server: GunicornServer) -> None:
    """Content-Length promises 100,000 bytes; 1,000 arrive, then the client stops sending."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
        s.sendall(b"\x89PNG" + b"\0" * 996)
        s.shutdown(socket.SHUT_WR)
        answer = s.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"incomplete_body"' in answer and b"frame-ancestors 'none'" in answer
    assert worker_pids(server.proc.pid) == server.workers
    chelsea_is_a_cat(server)


def _slow_client(port: int, until: float, body: bool, closed: list[float]) -> None:
    """Slowloris: a request that never ends, one byte at a time, for a bounded time."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            if body:
                s.sendall(
                    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 99999\r\n\r\n"
                )
            else:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() < until:
                s.sendall(b"x" if body else b"X-Slow: 1\r\n")
                time.sleep(0.5)
    except OSError:  # the server cut us off: what should happen
        closed.append(time.monotonic())


def test_slow_clients_do_not_block_others(server: GunicornServer) -> None:
    """Twice as many trickling clients as request threads, for 8x the read timeout; other clients are
    answered within a few read timeouts meanwhile (without the deadline they waited until the end)."""
    trickle = 8 * READ_TIMEOUT
    until = time.monotonic() + trickle
    closed: list[float] = []
    slow = [
        threading.Thread(target=_slow_client, args=(server.port, until, i % 2 == 0, closed), daemon=True)
        for i in range(2 * THREADS)
    ]
    for t in slow:
        t.start()
    time.sleep(0.5)
    answered = []
    for _ in range(3):
        started = time.monotonic()
        r = requests.get(server.url("/readyz"), timeout=3 * READ_TIMEOUT + 2)
        assert r.status_code == 200
        answered.append(time.monotonic() - started)
        assert time.monotonic() < until, "the slow clients had already stopped: nothing was proven"
    for t in slow:
        t.join(trickle + 10)
    assert len(closed) == len(slow), "the server did not cut every slow client off"
    assert "not received within" in server.log()
    assert worker_pids(server.proc.pid) == server.workers
    chelsea_is_a_cat(server)


def test_clients_that_linger_after_the_answer_do_not_stall_the_worker(server: GunicornServer) -> None:
    """gunicorn's graceful close waited up to 2 s per such client on the worker's main thread (10 of
    them stalled every other client for seconds); serving.worker closes without lingering."""
    lingering = []
    try:
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            lingering.append(s)  # never read, never closed until the end
        time.sleep(0.3)
        r = requests.get(server.url("/healthz"), timeout=5)
        assert r.status_code == 200
    finally:
        for s in lingering:
            s.close()


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/models", "/metrics", "/openapi.json", "/nope"])
def test_security_headers_on_every_endpoint(server: GunicornServer, path: str) -> None:
    r = requests.get(server.url(path), timeout=30)
    assert r.status_code in (200, 404)
    assert_security_headers(r)
    assert r.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),  # a control byte in the request line
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: y\r\n" * 200 + b"\r\n", 431, "request_header_fields_too_large"),
    ],
    ids=["bad-request-line", "uri-too-long", "too-many-headers"],
)
def test_requests_gunicorn_refuses_get_the_apps_json_and_headers(
    server: GunicornServer, raw: bytes, status: int, code: str
) -> None:
    """These never reach Flask: gunicorn answers them, through serving.worker.write_json_error."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(raw)
        answer = s.makefile("rb").read()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), lines[0]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/json" and headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"] and int(headers["content-length"]) == len(body)
    assert worker_pids(server.proc.pid) == server.workers


def test_log_has_no_traceback_and_no_worker_restart(server: GunicornServer) -> None:
    log = server.log()
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log
    assert log.count("Booting worker") == 1


API_KEY = "s3cret-Key-" + "7f" * 16
WRONG_KEY = "not-the-key-" + "3c" * 16


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, default_bundle: Path):
    folder = tmp_path_factory.mktemp("keyed-models")
    (folder / "default.pth").symlink_to(default_bundle)
    srv = GunicornServer(
        folder, tmp_path_factory.mktemp("keyed-logs") / "gunicorn.log", threads=2, env={"FLASK_API_KEY": API_KEY}
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "headers, params",
    [
        ({}, {}),
        ({"Authorization": f"Bearer {WRONG_KEY}"}, {}),
        ({"Authorization": f"Bearer {API_KEY[:-1]}"}, {}),
        ({"Authorization": f"Basic {API_KEY}"}, {}),
        ({"Authorization": API_KEY}, {}),
        ({"X-API-Key": API_KEY}, {}),
        ({}, {"api_key": WRONG_KEY}),
        ({"Authorization": "Basic " + base64.b64encode(f"{WRONG_KEY}:".encode()).decode()}, {}),
    ],
    ids=["missing", "wrong", "prefix", "basic-scheme", "no-scheme", "other-header", "query-string", "basic-user"],
)
def test_api_key_refused(keyed_server: GunicornServer, photos, headers, params) -> None:
    kwargs = upload("chelsea.png", photos["chelsea"].read_bytes(), headers=headers, params=params)
    r = requests.post(keyed_server.url("/predict"), timeout=60, **kwargs)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert_security_headers(r)


def test_api_key_accepted_and_never_logged(keyed_server: GunicornServer, photos) -> None:
    kwargs = upload("chelsea.png", photos["chelsea"].read_bytes(), headers={"Authorization": f"Bearer {API_KEY}"})
    r = requests.post(keyed_server.url("/predict"), timeout=60, **kwargs)
    assert r.status_code == 200 and top_label(r.json()) in CAT_LABELS
    assert requests.get(keyed_server.url("/healthz"), timeout=10).status_code == 200  # health stays open
    log = keyed_server.log()
    assert "401" in log and "unauthorized" in log  # the refusals were logged...
    for secret in (API_KEY, WRONG_KEY, API_KEY[:-1]):
        assert secret not in log  # ...without the keys


def test_kept_alive_connection_survives_early_error_answers(server: GunicornServer, photos) -> None:
    """Answers given before the body was read (413, 415) close the connection themselves: the client's
    next request on its kept-alive connection used to die with "Remote end closed connection"."""
    by_name = {c.name: c for c in CASES}
    chelsea = photos["chelsea"].read_bytes()
    with requests.Session() as session:
        for name in ["body_over_limit_declared", "body_over_limit_chunked", "text_plain_body"] * 2:
            case = by_name[name]
            r = session.request(case.method, server.url(case.path), timeout=60, **case.request_kwargs())
            assert r.status_code == case.status and r.headers.get("Connection") == "close"
            ok = session.post(server.url("/predict"), files={"file": ("c.png", chelsea)}, timeout=60)
            assert ok.status_code == 200 and top_label(ok.json()) in CAT_LABELS
