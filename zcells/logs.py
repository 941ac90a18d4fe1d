"""Structured log lines: ``event key=value ...``, one line per event, arguments formatted lazily.

A value is quoted when it holds spaces or quotes, so a line splits back into
fields with `shlex.split`. Payloads from the wire are never logged with
``repr``: a hostile, deeply nested value could break it.

Lines a peer can cause (a refused frame, key or request) go through `limited`,
so no peer can make the log its amplifier: each (event, peer) may write
`burst` lines at once and then one per `interval_s`, and each event at most
`event_burst` at once and `event_per_s` a second whoever causes it. What is
held back is counted, and the next line that goes out for that event and peer
says how many with ``suppressed=N``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class _Bucket:
    tokens: float
    at: float
    held: int = 0


class RateLimiter:
    """Token buckets per (event, key) and per event; thread-safe (ZAP logs from its thread)."""

    def __init__(
        self,
        *,
        burst: int = 5,
        interval_s: float = 10.0,
        event_burst: int = 50,
        event_per_s: float = 10.0,
        keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.rate = burst, 1.0 / interval_s
        self.event_burst, self.event_rate = event_burst, event_per_s
        self._keys = keys
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._events: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self.suppressed = 0  # lines held back since start, all events

    def admit(self, event: str, key: str) -> int | None:
        """None to hold this line back; else how many were held back before it."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get((event, key))
            if bucket is None:
                bucket = self._buckets[(event, key)] = _Bucket(float(self.burst), now)
                if len(self._buckets) > self._keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end((event, key))
            overall = self._events.get(event)
            if overall is None:
                overall = self._events[event] = _Bucket(float(self.event_burst), now)
            _refill(bucket, now, self.rate, self.burst)
            _refill(overall, now, self.event_rate, self.event_burst)
            if bucket.tokens < 1.0 or overall.tokens < 1.0:
                bucket.held += 1
                self.suppressed += 1
                return None
            bucket.tokens -= 1.0
            overall.tokens -= 1.0
            held, bucket.held = bucket.held, 0
            return held


def _refill(bucket: _Bucket, now: float, rate: float, cap: int) -> None:
    bucket.tokens = min(float(cap), bucket.tokens + (now - bucket.at) * rate)
    bucket.at = now


LIMITER = RateLimiter()


def limited(logger: logging.Logger, level: int, name: str, per: object, **fields: Any) -> None:
    """Log one event line a peer can cause, within `LIMITER`'s rates for (name, per)."""
    if not logger.isEnabledFor(level):
        return
    held = LIMITER.admit(name, str(per))
    if held is None:
        return
    if held:
        fields["suppressed"] = held
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
