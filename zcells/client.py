"""The Python client of a cell's api endpoint: calls, broadcasts, ping.

A client talks to one cell. It sends requests with an empty routing path; the
cell re-issues them in the client's name and answers with one response per
request, matched here by `reply_to`, so many calls can share one link.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from zcells.clock import SYSTEM_CLOCK, Clock
from zcells.errors import CallTimeout, ProtocolError, TransportClosed
from zcells.messages import (
    Broadcast,
    CellResult,
    Direction,
    Hello,
    Outcome,
    Response,
    Targeted,
    new_message_id,
)
from zcells.transport import ClientTransport

# The cell answers a timed-out request itself; the client waits a little longer
# than the budget it gave, so it hears that answer rather than guessing.
_GRACE_S = 1.0


@dataclass(frozen=True)
class Ping:
    cell: str
    ok: bool
    rtt_ms: float | None
    error: str | None = None
    code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "cell": self.cell,
            "ok": self.ok,
            "error": self.error,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
        }


class CellClient:
    """An open link to one cell, usable as ``async with CellClient(transport) as c``."""

    def __init__(
        self,
        transport: ClientTransport,
        *,
        timeout_s: float = 60.0,
        max_hops: int = 10,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self.max_hops = max_hops
        self.clock = clock
        self.cell_path: str | None = None
        self._waiting: dict[bytes, asyncio.Future[Response]] = {}
        self._hello: asyncio.Future[Hello] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CellClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the link and learn the cell's full path from its hello."""
        await self.transport.connect()
        self._hello = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(), name="client-reader")
        await self.transport.send(
            Hello(id=new_message_id(), sent_at=self.clock.wall(), cell_type="client")
        )
        try:
            async with asyncio.timeout(min(self.timeout_s, 10.0)):
                hello = await self._hello
        except TimeoutError:
            await self.close()
            raise CallTimeout("the cell did not answer the client's hello") from None
        self.cell_path = hello.path

    async def _read(self) -> None:
        while True:
            try:
                message = await self.transport.recv()
            except ProtocolError:
                continue  # a malformed answer is the cell's bug; its caller will time out
            except (TransportClosed, asyncio.CancelledError):
                break
            if isinstance(message, Response):
                future = self._waiting.pop(message.reply_to, None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif isinstance(message, Hello) and self._hello and not self._hello.done():
                self._hello.set_result(message)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(TransportClosed("the link to the cell closed"))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        await self.transport.close()

    async def _request(self, message: Targeted | Broadcast, timeout_s: float) -> Response:
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._waiting[message.id] = future
        try:
            await self.transport.send(message)
            async with asyncio.timeout(timeout_s + _GRACE_S):
                return await future
        except TimeoutError:
            raise CallTimeout(f"no answer to {message.method} within {timeout_s:g}s") from None
        finally:
            self._waiting.pop(message.id, None)

    def _fields(
        self, method: str, body: Mapping[str, Any], timeout_s: float, direction: Direction
    ) -> dict[str, Any]:
        return {
            "id": new_message_id(),
            "method": method,
            "body": dict(body),
            "direction": direction,
            "path": (),
            "hops": 0,
            "max_hops": self.max_hops,
            "want_response": True,
            "timeout_ms": int(timeout_s * 1000),
            "sent_at": self.clock.wall(),
            "context": None,
        }

    async def call(
        self,
        method: str,
        body: Mapping[str, Any] | None = None,
        *,
        target: str | None = None,
        timeout_s: float | None = None,
    ) -> CellResult:
        """A targeted call to the cell at `target` (default: the connected cell)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        target = target or self.cell_path
        if target is None:
            raise CallTimeout("the cell has not said where it sits in the tree")
        message = Targeted(
            **self._fields(method, body or {}, timeout_s, Direction.DOWN), target=target
        )
        response = await self._request(message, timeout_s)
        if len(response.results) != 1:
            raise ProtocolError(f"expected one result, got {len(response.results)}")
        return response.results[0]

    async def request(
        self,
        method: str,
        body: Mapping[str, Any] | None = None,
        *,
        target: str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """A targeted call's value; the cell's error is raised as its typed `WireError`."""
        result = await self.call(method, body, target=target, timeout_s=timeout_s)
        return result.unwrap()

    async def cast(
        self, method: str, body: Mapping[str, Any] | None = None, *, target: str | None = None
    ) -> None:
        """A targeted request that wants no answer: sent, not waited for."""
        target = target or self.cell_path
        if target is None:
            raise CallTimeout("the cell has not said where it sits in the tree")
        fields = self._fields(method, body or {}, self.timeout_s, Direction.DOWN)
        fields["want_response"] = False
        await self.transport.send(Targeted(**fields, target=target))

    async def broadcast(
        self,
        method: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        direction: Direction = Direction.DOWN,
        run_locally: bool = True,
    ) -> tuple[tuple[CellResult, ...], float]:
        """One result per cell of the connected cell's subtree, and the link's own time in ms."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        message = Broadcast(
            **self._fields(method, body or {}, timeout_s, direction), run_locally=run_locally
        )
        started = self.clock.now()
        response = await self._request(message, timeout_s)
        link_ms = max(0.0, (self.clock.now() - started) * 1000.0 - response.held_ms)
        return response.results, link_ms

    async def ping(self, path: str | None = None, timeout_s: float | None = None) -> Ping:
        """Ping one cell; raises its typed error if routing or the cell failed."""
        started = self.clock.now()
        result = await self.call("ping", target=path, timeout_s=timeout_s)
        rtt = (self.clock.now() - started) * 1000.0
        value = result.unwrap()
        return Ping(cell=str(value.get("cell", result.cell)), ok=True, rtt_ms=rtt)

    async def ping_all(self, timeout_s: float | None = None) -> list[Ping]:
        """Ping every cell below the connected one, itself included: one row per cell."""
        results, link_ms = await self.broadcast("ping", timeout_s=timeout_s)
        rows = []
        for r in results:
            if r.outcome is Outcome.OK:
                rtt = None if r.rtt_ms is None else r.rtt_ms + link_ms
                rows.append(Ping(r.cell, True, rtt))
            elif r.outcome is Outcome.TIMED_OUT:
                rows.append(Ping(r.cell, False, None, "timed out", CallTimeout.code))
            else:
                assert r.error is not None
                rows.append(Ping(r.cell, False, None, r.error.message, r.error.code))
        return rows
