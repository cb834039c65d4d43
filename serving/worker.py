"""gunicorn's gthread worker with a deadline for receiving each request (slow-client protection).

gthread hands a connection to a request thread as soon as its first bytes arrive; the thread then
reads the headers and the body with blocking reads and no overall limit. A client that trickles a byte
every second (slowloris) holds that thread for as long as it likes, and as many such clients as there
are threads stop the worker from answering anybody (measured: 8 trickling clients held a 4-thread
worker for 23 s, until they chose to stop). Here every read of a request's headers and body must
finish by ``GUNICORN_READ_TIMEOUT`` seconds (default 20) after the thread took the request; a client
that is not done by then is treated as disconnected and its connection is closed, freeing the thread.

It also closes the connection after an answer given before the request body was read (413, 415...):
gunicorn announced keep-alive, then found more than 64 KiB left to discard and closed anyway, so the
client's next request on that connection failed ("Remote end closed connection without response";
seen by bench/soak.py after 413s). Now the answer itself says ``Connection: close``.

Requests gunicorn itself refuses (a malformed request line, headers over its limits) never reach
Flask; their answers are written by ``gunicorn.util.write_error`` as an HTML page without the app's
security headers. In this worker's process that function is replaced by ``write_json_error``: the
app's JSON error shape, with the same security headers as every other answer.

The limit covers receiving, not computing: the app reads the whole upload before it decodes or infers.
A buffering reverse proxy (nginx) in front remains the first line of defence on a public network.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from gunicorn import util
from gunicorn.http.body import ChunkedReader, LengthReader
from gunicorn.workers.gthread import TConn, ThreadWorker

DEFAULT_READ_TIMEOUT = 20.0
MAX_ERROR_DETAIL = 200  # characters of gunicorn's detail (it quotes what the client sent) kept in the answer


def read_timeout_from_env() -> float:
    value = float(os.environ.get("GUNICORN_READ_TIMEOUT", DEFAULT_READ_TIMEOUT))
    if not value > 0:
        raise ValueError(f"GUNICORN_READ_TIMEOUT must be positive, not {value}")
    return value


class _DeadlineSocket:
    """The connection's socket as the HTTP parser sees it: reads stop at the request's deadline."""

    def __init__(self, sock: socket.socket, conn: DeadlineConn) -> None:
        self._sock = sock
        self._conn = conn

    def recv(self, size: int) -> bytes:
        remaining = self._conn.read_deadline - time.monotonic()
        if remaining <= 0:
            return self._expired()
        prior = self._sock.gettimeout()  # the parser's own drain sets one; keep the shorter
        self._sock.settimeout(remaining if prior is None else min(prior, remaining))
        try:
            return self._sock.recv(size)
        except TimeoutError:
            if time.monotonic() >= self._conn.read_deadline:
                return self._expired()
            raise
        finally:
            self._sock.settimeout(prior)

    def _expired(self) -> bytes:
        """End of data: the parser and the app see a client that went away, and the connection closes."""
        conn = self._conn
        if not conn.expired:
            conn.expired = True
            conn.log.warning(
                "closing %s: the request was not received within %.0fs (slow client)",
                conn.client[0] if isinstance(conn.client, tuple) else conn.client,
                conn.read_timeout,
            )
        return b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class DeadlineConn(TConn):
    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any, *, read_timeout: float, log: Any):
        super().__init__(cfg, sock, client, server)
        self.read_timeout = read_timeout
        self.read_deadline = time.monotonic() + read_timeout
        self.expired = False  # set once a read hit the deadline: the connection then closes
        self.log = log

    def close(self, graceful: bool = False) -> None:
        """Never linger: gunicorn's graceful close waits up to 2 s for the client on the worker's main
        thread (which also accepts and dispatches every connection), so clients that keep sending, or
        keep the connection open, after the answer could stall the worker 2 s each. Only what the
        client has already sent is drained (so the kernel does not reset the answer); then it closes.
        """
        if graceful and not self.expired:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.settimeout(0)
                for _ in range(16):  # at most 64 KiB already received
                    if not self.sock.recv(4096):
                        break
            except OSError:  # nothing buffered (BlockingIOError), or the peer is gone
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    def init(self) -> None:
        super().init()
        unreader = getattr(self.parser, "unreader", None)  # HTTP/1 parsers read through a SocketUnreader
        if unreader is not None and isinstance(getattr(unreader, "sock", None), socket.socket):
            unreader.sock = _DeadlineSocket(unreader.sock, self)


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's error answer in the app's shape: ``{"error": {"code", "message"}}`` plus its headers."""
    from serving.errors import HTTP_ERROR_CODES  # the app is loaded by now: these are already imported
    from serving.http import DEFAULT_CSP, SECURITY_HEADERS

    code = HTTP_ERROR_CODES.get(status_int) or reason.lower().replace(" ", "_")
    detail = mesg[:MAX_ERROR_DETAIL]
    body = json.dumps({"error": {"code": code, "message": f"{reason}: {detail}" if detail else reason}}).encode()
    headers = {
        "Connection": "close",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        **SECURITY_HEADERS,
        "Content-Security-Policy": DEFAULT_CSP,
    }
    head = f"HTTP/1.1 {status_int} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    util.write_nonblock(sock, head.encode("latin-1") + body)


class DeadlineThreadWorker(ThreadWorker):
    """``worker_class = "serving.worker.DeadlineThreadWorker"`` in gunicorn.conf.py."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout_from_env()

    def init_process(self) -> None:
        util.write_error = write_json_error  # this worker process only; see the module docstring
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # the app itself, kept before wrapping: the drain (here and in gunicorn.conf.py) reaches its models
        self.flask_app = self.wsgi
        self.wsgi = close_when_body_left(self.wsgi)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: gthread stops accepting and finishes the connections it has (up to graceful_timeout).
        Readiness turns 503 now, not when the worker has exited, so that the load balancer sees the pod
        go while the requests it already sent are answered. Runs as a signal handler: it only sets a
        flag; the log line is written by the worker's main loop.
        """
        stopping = self.alive
        super().handle_exit(sig, frame)
        registry = models_of(self)
        if stopping and registry is not None:
            registry.start_draining()
            self.method_queue.defer(self._log_draining)

    def _log_draining(self) -> None:
        self.log.info("draining: /readyz answers 503 from now on; finishing %d open connections", self.nr_conns)

    def accept(self, listener: socket.socket) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except BlockingIOError:  # another worker took it
            return
        except ConnectionAbortedError:
            return
        self.nr_conns += 1
        client_sock.setblocking(True)
        conn = DeadlineConn(
            self.cfg,
            client_sock,
            client_addr,
            listener.getsockname(),
            read_timeout=self.read_timeout,
            log=self.log,
        )
        self.enqueue_req(conn)

    def handle(self, conn: TConn) -> Any:
        if isinstance(conn, DeadlineConn):  # each request on a kept-alive connection gets its own time
            conn.read_deadline = time.monotonic() + conn.read_timeout
        return super().handle(conn)

    def _keepalive_after(self, conn: TConn, keepalive: Any) -> Any:
        # A body cut short by the deadline can look fully read to the parser: never reuse the connection.
        if getattr(conn, "expired", False):
            return False
        return super()._keepalive_after(conn, keepalive)


def models_of(worker: Any) -> Any:
    """The app's ModelRegistry (serving/registry.py) once the worker has loaded the app, else None."""
    extensions = getattr(getattr(worker, "flask_app", None), "extensions", None)
    return extensions.get("imgclf.models") if isinstance(extensions, dict) else None


def close_when_body_left(app: Any) -> Any:
    """WSGI wrapper: an answer that leaves request body unread also closes the connection."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if body_left(environ):
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:  # gunicorn's Response: send "Connection: close"
                    force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped


def body_left(environ: dict[str, Any]) -> bool:
    body = environ.get("wsgi.input")
    if getattr(body, "failed", False) is True:
        return True
    reader = getattr(body, "reader", None)
    if isinstance(reader, LengthReader):
        return reader.length > 0
    if isinstance(reader, ChunkedReader):
        return reader.parser is not None
    return False
