"""Docker HEALTHCHECK: exit 0 when the service in this container answers ``GET /readyz`` with 200.

Python's standard library only (the slim image has no curl). It asks where gunicorn listens: the first
bind in ``GUNICORN_CMD_ARGS``, else gunicorn.conf.py's default from ``$IMGCLF_HOST`` (the image's
0.0.0.0) and ``$PORT`` (8000 when unset), so ``-e PORT=8080`` or another bind does not break the check;
a wildcard host is asked on 127.0.0.1.

    python deploy/healthcheck.py [--path /readyz] [--timeout 4]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}  # noqa: S104 (recognised, not bound to)


def default_bind(environ: Mapping[str, str]) -> str:
    """gunicorn.conf.py's bind when none is given: $IMGCLF_HOST (else 127.0.0.1) and $PORT (else 8000)."""
    host = environ.get("IMGCLF_HOST") or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{environ.get('PORT') or '8000'}"


IMAGE_DEFAULT_BIND = default_bind({"IMGCLF_HOST": "0.0.0.0"})  # noqa: S104 - what the image's ENV makes


def first_tcp_bind(gunicorn_cmd_args: str, default: str = IMAGE_DEFAULT_BIND) -> str:
    """The first ``--bind``/``-b`` HOST:PORT in gunicorn's command-line arguments, else ``default``."""
    tokens = shlex.split(gunicorn_cmd_args)
    for i, token in enumerate(tokens):
        value = None
        if token in ("--bind", "-b") and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif token.startswith("--bind="):
            value = token.removeprefix("--bind=")
        elif token.startswith("-b") and not token.startswith("--") and len(token) > 2:
            value = token[2:]
        if value and not value.startswith(("unix:", "fd://")):
            return value
    return default


def url_for(bind: str, path: str) -> str:
    host, _, port = bind.rpartition(":")
    if not host:  # a bare port
        host, port = "", bind
    host = "127.0.0.1" if host in WILDCARDS else host
    return f"http://{host}:{port}{path}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Exit 0 if the local service answers the path with 200.")
    p.add_argument("--path", default="/readyz", help="endpoint to ask (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=4.0, help="seconds to wait (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> int:
    url = url_for(first_tcp_bind(os.environ.get("GUNICORN_CMD_ARGS", ""), default_bind(os.environ)), args.path)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310 (http to ourselves)
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"unhealthy: {url} answered {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
