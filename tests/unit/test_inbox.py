"""The inbox pumps fill: bounded by count and by bytes, nothing dropped while it is open."""

from __future__ import annotations

from tests.fakes import run
from zcells.sockets.client import Inbox


def test_large_messages_fill_the_inbox_by_bytes_before_count() -> None:
    inbox: Inbox[str] = Inbox(100, max_bytes=3000)
    for i in range(3):
        assert inbox.room() > 0
        inbox.put(f"m{i}", 1000)
    assert inbox.room() == 0 and inbox.bytes() == 3000  # 3 of 100 by count, full by bytes
    inbox.put("past the bound", 1000)  # kept all the same: nothing is dropped
    assert inbox.size() == 4

    async def drain() -> list[str | None]:
        return [await inbox.get() for _ in range(4)]

    assert run(drain()) == ["m0", "m1", "m2", "past the bound"]
    assert inbox.bytes() == 0 and inbox.room() == 100


def test_without_a_byte_bound_only_the_count_counts() -> None:
    inbox: Inbox[str] = Inbox(2)
    inbox.put("a", 10**9)
    assert inbox.room() == 1
    inbox.put("b")
    assert inbox.room() == 0


def test_the_end_keeps_the_bytes_in_step() -> None:
    inbox: Inbox[str] = Inbox(2, max_bytes=10**6)
    for name in "abc":
        inbox.put(name, 100)
    inbox.end()

    async def drain() -> list[str | None]:
        return [await inbox.get() for _ in range(3)]

    # What waited past the bound, and the oldest, make room for the end marker.
    assert run(drain()) == ["b", None, None]
    assert inbox.bytes() == 0
