"""Log lines a client cannot forge: control characters in what gets logged are escaped.

Request paths arrive percent-decoded (``GET /%0Afake-line`` has the path ``"/\\nfake-line"``), and header
values, file names and exception messages may quote client bytes too. Written as they are, a newline
starts a line the client wrote, and an ANSI escape sequence (ESC) rewrites the operator's terminal.
Every handler the service logs through (gunicorn's access and error logs, and the root logger that
gunicorn.conf.py sets up for the app's own loggers) has the ``EscapeControl`` filter.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from gunicorn import glogging

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators some log viewers break lines at
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# a traceback keeps its line breaks; each of its lines is indented, so that a line at column 0 is
# always the start of a log record, whatever an exception message quoted
_TRACEBACK_INDENT = "    "


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_control(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROL.sub(_escape, text)


def escape_block(text: str) -> str:
    """A multi-line block (a traceback): controls escaped within each line, every line indented."""
    return "\n".join(_TRACEBACK_INDENT + escape_control(line) for line in text.split("\n"))


class EscapeControl(logging.Filter):
    """A handler filter that escapes the record itself, so any formatter (gunicorn's, syslog's, a
    logconfig's) writes it safely: the message is rendered and escaped, a traceback or stack rendered,
    escaped and indented (``exc_text`` is the cache every ``logging.Formatter`` uses)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_control_escaped", False):
            record.msg, record.args = escape_control(record.getMessage()), None
            if record.exc_info and not record.exc_text:
                record.exc_text = _FORMATTER.formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = escape_block(record.exc_text.rstrip("\n"))
            if record.stack_info:
                record.stack_info = escape_block(record.stack_info.rstrip("\n"))
            record._control_escaped = True
        return True


_FORMATTER = logging.Formatter()


def escape_handlers(logger: logging.Logger) -> None:
    """Every handler of ``logger`` escapes what it writes (also records propagated from other loggers)."""
    for handler in logger.handlers:
        if not any(isinstance(f, EscapeControl) for f in handler.filters):
            handler.addFilter(EscapeControl())


class LazyAtoms(Mapping[str, Any]):
    """gunicorn's access-log atoms, each computed when the format asks for it.

    gunicorn's own ``atoms`` builds all of them for every request (twenty, plus one per request header,
    response header and environ variable, then a quoted copy of them all), which costs more than the
    line the format writes. The values, the escaped double quotes, the case-insensitive header names
    and the ``-`` for a missing atom are gunicorn's (``SafeAtoms``); a test compares the two on every atom.
    """

    __slots__ = ("_logger", "_resp", "_req", "_environ", "_time")

    def __init__(self, logger: glogging.Logger, resp: Any, req: Any, environ: dict[str, Any], request_time: Any):
        self._logger, self._resp, self._req, self._environ, self._time = logger, resp, req, environ, request_time

    def __getitem__(self, key: str) -> Any:
        value = self._value(key.lower() if key.startswith("{") else key)
        return value.replace('"', '\\"') if isinstance(value, str) else value

    def __iter__(self) -> Iterator[str]:  # what `logging` needs to see a mapping; the format names its keys
        return iter(_ATOMS)

    def __len__(self) -> int:
        return len(_ATOMS)

    def _value(self, key: str) -> Any:
        if key in _ATOMS:
            return _ATOMS[key](self)
        if key.startswith("{") and key.endswith(("}i", "}o", "}e")):
            name, kind = key[1:-2], key[-1]
            if kind == "e":
                pairs = self._environ.items()
            else:
                holder = self._req if kind == "i" else self._resp
                pairs = getattr(holder, "headers", holder)
                pairs = pairs.items() if hasattr(pairs, "items") else pairs
            found = "-"
            for k, v in pairs:  # the last one wins, as in gunicorn's dict
                if k.lower() == name:
                    found = v
            return found
        return "-"

    def _status(self) -> Any:
        status = self._resp.status
        return status.split(None, 1)[0] if isinstance(status, str) else status

    def _sent(self) -> Any:
        return getattr(self._resp, "sent", None)


def _env(name: str, default: Any = None) -> Any:
    return lambda a: a._environ.get(name, default)


_ATOMS: dict[str, Any] = {
    "h": _env("REMOTE_ADDR", "-"),
    "l": lambda a: "-",
    "u": lambda a: a._logger._get_user(a._environ) or "-",
    "t": lambda a: a._logger.now(),
    "r": lambda a: f"{a._environ['REQUEST_METHOD']} {a._environ['RAW_URI']} {a._environ['SERVER_PROTOCOL']}",
    "s": LazyAtoms._status,
    "m": _env("REQUEST_METHOD"),
    "U": _env("PATH_INFO"),
    "q": _env("QUERY_STRING"),
    "H": _env("SERVER_PROTOCOL"),
    "b": lambda a: a._sent() is not None and str(a._sent()) or "-",
    "B": LazyAtoms._sent,
    "f": _env("HTTP_REFERER", "-"),
    "a": _env("HTTP_USER_AGENT", "-"),
    "T": lambda a: a._time.seconds,
    "D": lambda a: a._time.seconds * 1000000 + a._time.microseconds,
    "M": lambda a: a._time.seconds * 1000 + int(a._time.microseconds / 1000),
    "L": lambda a: f"{a._time.seconds}.{a._time.microseconds:06d}",
    "p": lambda a: f"<{os.getpid()}>",
}


class EscapingLogger(glogging.Logger):
    """gunicorn's logger (``logger_class`` in gunicorn.conf.py) whose access and error lines are escaped,
    and whose access atoms are computed only as the format needs them (``LazyAtoms``)."""

    atoms_wrapper_class = staticmethod(lambda atoms: atoms)  # LazyAtoms already quotes like SafeAtoms

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)  # also on a configuration reload, which makes new handlers
        escape_handlers(self.error_log)
        escape_handlers(self.access_log)

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> Mapping[str, Any]:
        return LazyAtoms(self, resp, req, environ, request_time)
