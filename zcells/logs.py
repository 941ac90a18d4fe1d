"""Structured log lines: ``event key=value ...``, one line per event, arguments formatted lazily.

A value is quoted when it holds spaces or quotes, so a line splits back into
fields with `shlex.split`. Payloads from the wire are never logged with
``repr``: a hostile, deeply nested value could break it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

LOGGER_NAME = "zcells"


class _Event:
    """Formats only if the line is emitted."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: dict[str, Any]) -> None:
        self.event = event
        self.fields = fields

    def __str__(self) -> str:
        parts = [self.event]
        for key, value in self.fields.items():
            parts.append(f"{key}={_format(value)}")
        return " ".join(parts)


def _format(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(c in text for c in " \"'=\\") or not text.isprintable():
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped) + '"'
    return text


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one structured event line."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", _Event(name, fields))


def configure(level: str = "info", stream: Any = None) -> None:
    """Send zcells logs to stderr as ``time level logger event key=value ...``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    )
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
