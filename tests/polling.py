"""The one way tests wait: poll a condition until it holds, with a deadline.

`until` takes a check that returns something true when done (a plain
function or a coroutine function), calls it every `interval_s`, and fails
naming `what` and the last value seen if `timeout_s` passes first. The
deadline is a safety net for a loaded machine, never an expectation; tests
assert what happened, not how long it took. Blocking code (a test driving
processes without an event loop) uses `zcells.devtree.wait_until`, the same
loop without `await`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def until(
    check: Callable[[], Any | Awaitable[Any]],
    timeout_s: float,
    what: str,
    interval_s: float = 0.01,
) -> Any:
    """What `check` returned once it was true; `AssertionError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:g}s waiting for {what}; last: {str(last)[:2000]}"
            )
        await asyncio.sleep(interval_s)
