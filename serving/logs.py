"""Log lines a client cannot forge: control characters in what gets logged are escaped.

Request paths arrive percent-decoded (``GET /%0Afake-line`` has the path ``"/\\nfake-line"``), and header
values, file names and exception messages may quote client bytes too. Written as they are, a newline
starts a line the client wrote, and an ANSI escape sequence (ESC) rewrites the operator's terminal.
Every handler the service logs through (gunicorn's access and error logs, and the root logger that
gunicorn.conf.py sets up for the app's own loggers) has the ``EscapeControl`` filter.
"""

from __future__ import annotations

import logging
import re
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


class EscapingLogger(glogging.Logger):
    """gunicorn's logger (``logger_class`` in gunicorn.conf.py) whose access and error lines are escaped."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)  # also on a configuration reload, which makes new handlers
        escape_handlers(self.error_log)
        escape_handlers(self.access_log)
