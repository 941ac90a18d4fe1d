"""Log lines a peer can cause are rate-limited per event and peer, with a count of what was held."""

from __future__ import annotations

import io
import logging

from zcells import logs


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_gets_its_burst_then_one_line_per_interval_and_hears_the_count() -> None:
    clock = FakeClock()
    limiter = logs.RateLimiter(burst=3, interval_s=10.0, clock=clock)
    admitted = [limiter.admit("transport.malformed", "child:r") for _ in range(100)]
    assert admitted[:3] == [0, 0, 0] and set(admitted[3:]) == {None}
    assert limiter.admit("transport.malformed", "child:s") == 0  # another peer: its own bucket
    clock.now += 10.0
    assert limiter.admit("transport.malformed", "child:r") == 97  # what was held back
    assert limiter.admit("transport.malformed", "child:r") is None
    assert limiter.suppressed == 98


def test_an_event_has_a_ceiling_whoever_causes_it() -> None:
    clock = FakeClock()
    limiter = logs.RateLimiter(burst=5, event_burst=10, event_per_s=2.0, clock=clock)
    admitted = [limiter.admit("zap.refused", f"10.0.0.{i}") for i in range(50)]
    assert sum(a is not None for a in admitted) == 10
    clock.now += 1.0
    assert sum(limiter.admit("zap.refused", f"10.0.1.{i}") is not None for i in range(50)) == 2


def test_the_key_table_is_bounded() -> None:
    limiter = logs.RateLimiter(keys=10, event_burst=10**6)
    for i in range(1000):
        limiter.admit("e", str(i))
    assert len(limiter._buckets) == 10


def test_limited_writes_suppressed_on_the_next_line() -> None:
    clock = FakeClock()
    logs.LIMITER = logs.RateLimiter(burst=1, interval_s=1.0, clock=clock)
    stream = io.StringIO()
    logger = logging.getLogger("zcells.test_logs")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in range(5):
            logs.limited(logger, logging.WARNING, "message.refused", "child:r", code="E_SCHEMA")
        clock.now += 1.0
        logs.limited(logger, logging.WARNING, "message.refused", "child:r", code="E_SCHEMA")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "message.refused code=E_SCHEMA",
        "message.refused code=E_SCHEMA suppressed=4",
    ]
