"""Reading ZeroMQ sockets from the event loop, and `ZmqClient`, a client's link to one cell.

Both halves of the ZeroMQ transport read their sockets the same way, and it
lives here so that `zcells.sockets.transport` can import it (and re-export
`ZmqClient`) without an import cycle:

* A `Pump` reads one plain (not zmq.asyncio) socket from the loop's own
  reader callback on ZMQ_FD, with non-blocking receives and no task or Future
  per message. ZMQ_FD is edge-triggered: it says "something changed", so a
  pump reads until ZMQ_EVENTS shows no POLLIN, at most `BATCH` messages per
  turn of the loop before it yields and goes on. A send processes the
  socket's commands too and can eat that edge, so every send is followed by
  `Pump.poke()`: one more look, at most once per turn of the loop. (Looking
  at once, right after the send, measured slower.)
* An `Inbox` is the bounded queue pumps fill. When it is full a pump stops
  reading (its socket's RCVHWM, then TCP, hold the sender back) and takes up
  again once the reader has emptied half of it. Link changes, which must not
  hold up a monitor socket, queue in order past the bound: nothing is
  dropped while the inbox is open.
* Every monitor socket has a pump that never pauses: libzmq's monitor send
  blocks once the monitor's pipe is full, which would stall the socket it
  watches. A pump is always stopped before its socket is closed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Generic, TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from zcells import codec, logs
from zcells.errors import (
    AccessDenied,
    Busy,
    CellUnreachable,
    FrameError,
    TransportBroken,
    TransportClosed,
)
from zcells.messages import Message
from zcells.sockets.auth import SocketOptions
from zcells.sockets.keys import check_environment
from zcells.transport import ClientTransport

log = logs.get_logger("sockets.transport")

BATCH: Final = 256  # messages one pump reads before it lets the rest of the loop run
KEEP_FRAMES: Final = 4  # frames kept of a message; the rest are counted, never kept
# Plain ints: combining zmq's flag enums costs more than the send it is for.
_NOBLOCK: Final = int(zmq.NOBLOCK)
_MORE: Final = int(zmq.NOBLOCK | zmq.SNDMORE)
_RCVMORE: Final = int(zmq.RCVMORE)
_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)

_FAILED: Final = "handshake failed: wrong server key, or no authenticator there"
SILENT: Final = (
    "the connection was taken but the handshake got no answer in time: "
    "the cell may be frozen or overloaded"
)
# Monitor event -> (link state, reason). A link is connecting, up, down, refused or
# failed; only a change of state becomes a LinkChange (and a log line).
LINK_EVENTS: Final[Mapping[int, tuple[str, str]]] = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: ("up", "connected"),
    zmq.EVENT_DISCONNECTED: ("down", "disconnected"),
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: ("refused", "handshake refused: our key is not accepted"),
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: ("failed", _FAILED),
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: ("failed", _FAILED),
}
MONITORED: Final = (
    zmq.EVENT_MONITOR_STOPPED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    | (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
)

T = TypeVar("T")
Socket = zmq.Socket[bytes]
Deliver = Callable[[list[Any], int], None]  # (the frames kept, how many there were)


def next_state(current: str, event: int, value: int = 0) -> tuple[str, str] | None:
    """The link's new (state, reason) after a monitor event, or None if nothing changed.

    A handshake that fails with no detail and EAGAIN ran out of time: the
    other end took the connection but said nothing (frozen or overloaded),
    which is not the same advice as a refused or garbled handshake.
    """
    found = LINK_EVENTS.get(event)
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and value == errno.EAGAIN:
        found = ("failed", SILENT)
    if found is None or found[0] == current or (found[0] == "down" and current != "up"):
        return None  # a repeat, or the disconnect that ends a failed handshake
    return found


def monitor_event(frames: list[Any], _count: int) -> tuple[int, int]:
    """The event number of one monitor message, and its value (an fd, an errno...)."""
    parsed = parse_monitor_message(frames)
    return int(parsed["event"]), int(parsed["value"])


# pyzmq's Socket.send is a Python layer (routing_id and group options) over the
# compiled send, which refuses str itself; plain bytes frames need none of it,
# and it runs once per frame.
_send_frame: Final = zmq.backend.Socket.send


def send_now(sock: Socket, frames: list[bytes]) -> None:
    """Queue one message without waiting: `zmq.Again` if libzmq cannot take it now.

    Frames are copied: pyzmq copies anything under 64 kB even with copy=False.
    A refusal comes on the first frame, so no message is ever half sent.
    """
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _send_frame(sock, frame, _NOBLOCK if i == last else _MORE)


class Inbox(Generic[T]):
    """A bounded queue filled by pumps: a full inbox pauses them, reading it resumes them.

    A deque and the futures of waiting readers, not an `asyncio.Queue`: an
    item goes in and out once per message, and a reader that finds one takes
    it without suspending. Items put while it is full (link changes, the rest
    of a message's handling) are kept, in order; `room()` is what pauses pumps.
    """

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        self._items: deque[T | None] = deque()
        self._sizes: deque[int] = deque()  # the bytes each item came as, in step with _items
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._readers: deque[asyncio.Future[None]] = deque()
        self._paused: list[Pump] = []
        self._resume_at = size // 2

    def room(self) -> int:
        """How many more items fit before the inbox is full (0 or less: none).

        Full by count, or by bytes when it has a byte bound: a peer's large
        messages pause the reading as soon as many small ones would.
        """
        if self._max_bytes is not None and self._bytes >= self._max_bytes:
            return 0
        return self._size - len(self._items)

    def size(self) -> int:
        return len(self._items)

    def bytes(self) -> int:
        return self._bytes

    def put(self, item: T, nbytes: int = 0) -> None:
        """Queue an item, even past the bound; never dropped, never waited on."""
        self._items.append(item)
        self._sizes.append(nbytes)
        self._bytes += nbytes
        self._wake()

    def _wake(self) -> None:
        readers = self._readers
        while readers:
            reader = readers.popleft()
            if not reader.done():
                reader.set_result(None)
                return

    def pause(self, pump: Pump) -> None:
        self._paused.append(pump)

    async def get(self) -> T | None:
        """The next item (returns at once if there is one); None once the inbox is ended.

        The end marker stays in place for every later reader.
        """
        items = self._items
        while not items:
            reader = asyncio.get_running_loop().create_future()
            self._readers.append(reader)
            try:
                await reader
            except BaseException:
                reader.cancel()
                if items and not reader.cancelled():  # woken, then cancelled: pass it on
                    self._wake()
                raise
        item = items[0]
        if item is None:
            return None
        items.popleft()
        self._bytes -= self._sizes.popleft()
        if (
            self._paused
            and len(items) <= self._resume_at
            and (self._max_bytes is None or self._bytes <= self._max_bytes // 2)
        ):
            paused, self._paused = self._paused, []
            for pump in paused:
                pump.resume()
        return item

    def end(self) -> None:
        """Drop what nobody read if that makes room, then the end marker, for every reader."""
        self._paused.clear()
        items, sizes = self._items, self._sizes
        while len(items) > self._size:  # what waited behind a full queue
            items.pop()
            self._bytes -= sizes.pop()
        if len(items) == self._size:
            items.popleft()
            self._bytes -= sizes.popleft()
        items.append(None)
        sizes.append(0)
        while self._readers:
            self._wake()


class Pump:
    """Reads one socket from the event loop and hands each message to `deliver`."""

    def __init__(
        self,
        sock: Socket,
        deliver: Deliver,
        failed: Callable[[str, Exception], None],
        *,
        inbox: Inbox[Any] | None = None,
        frame_first: bool = False,
    ) -> None:
        self.sock = sock
        self._deliver = deliver
        self._failed = failed  # ("recv" or "message", the exception); logs and counts
        self._inbox = inbox  # None: never pauses (monitors)
        self._copy_first = not frame_first  # a zmq.Frame first, to read its User-Id
        self._loop = asyncio.get_running_loop()
        self._fd = sock.FD
        self._get: Callable[[int], Any] = sock.get
        self._poked = self._paused = self._stopped = False
        self._loop.add_reader(self._fd, self._drain)
        self.poke()  # messages may be waiting already, their edge gone

    def poke(self) -> None:
        """Look at the socket again soon; after a send, which can consume the FD's edge."""
        if not self._poked and not self._stopped:
            self._poked = True
            self._loop.call_soon(self._drain)

    def read_now(self) -> None:
        """Read what is waiting at once, before the caller acts on another socket's news."""
        self._drain()

    def resume(self) -> None:
        if self._paused and not self._stopped:
            self._paused = False
            self._loop.add_reader(self._fd, self._drain)
            self.poke()

    def stop(self) -> None:
        """Stop reading for good; before the socket closes, as its FD goes with it."""
        if not self._stopped:
            self._stopped = True
            if not self._paused:
                self._loop.remove_reader(self._fd)

    def _drain(self) -> None:
        """Read what is waiting, at most `BATCH` messages, until ZMQ_EVENTS shows no POLLIN.

        Asking ZMQ_EVENTS before each message measured cheaper than receiving
        until EAGAIN: pyzmq raises `zmq.Again` for that, which costs about three
        times as much, and a wake-up often finds only one or two messages.
        """
        self._poked = False
        if not self._reading():
            return
        sock, get, inbox, deliver = self.sock, self._get, self._inbox, self._deliver
        limit = BATCH
        if inbox is not None:
            room = inbox.room()
            if room <= 0:
                self._paused = True
                self._loop.remove_reader(self._fd)
                inbox.pause(self)
                return
            limit = min(BATCH, room)
        for _ in range(limit):
            try:
                if not get(_EVENTS) & _POLLIN:
                    return
                frames, count = self._recv(sock)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                self._broken(exc)
                return
            try:
                deliver(frames, count)
            except Exception as exc:  # one message never ends the reading (SECURITY.md §0.8)
                self._failed("message", exc)
            if self._stopped:
                return
        self.poke()  # more may be waiting, or the inbox is full: let the rest of the loop run

    def _reading(self) -> bool:
        return not (self._stopped or self._paused)

    def _recv(self, sock: Socket) -> tuple[list[Any], int]:
        frames: list[Any] = [sock.recv(_NOBLOCK, copy=self._copy_first)]
        count = 1
        while sock.get(_RCVMORE):
            frame = sock.recv(_NOBLOCK)
            count += 1
            if count <= KEEP_FRAMES:
                frames.append(frame)
        return frames, count

    def _broken(self, exc: zmq.ZMQError) -> None:
        if self.sock.closed or exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
            self.stop()
        else:  # EINTR, say: look again on the next turn of the loop
            self._failed("recv", exc)
            self.poke()


def close_socket(sock: Socket, monitor: Socket | None, linger_ms: int) -> None:
    if monitor is not None:
        if not sock.closed:
            sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=linger_ms)


class ZmqClient(ClientTransport):
    """A client's CURVE link to one cell's api endpoint, with the cell's key pinned."""

    def __init__(
        self,
        endpoint: str,
        server_key: str,
        keypair: tuple[str, str],
        *,
        connect_timeout_s: float = 5.0,
        options: SocketOptions | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.server_key = server_key
        # A silent handshake gives up within half the connect wait, so the wait can say why.
        handshake_ms = max(100, min(5000, int(connect_timeout_s * 500)))
        self.options = options or SocketOptions(handshake_ivl_ms=handshake_ms)
        self.connect_timeout_s = connect_timeout_s
        self._keypair = keypair
        self._ctx: zmq.Context[Socket] | None = None
        self._socket: Socket | None = None
        self._monitor: Socket | None = None
        self._pumps: list[Pump] = []
        self._inbox: Inbox[list[bytes] | FrameError] = Inbox(self.options.hwm)
        self._state = "connecting"
        self._failure = ""
        self._changed = asyncio.Event()
        self._closed = False

    async def connect(self) -> None:
        """Dial and wait for the handshake: `AccessDenied` if refused, `CellUnreachable` if none."""
        if self._closed:
            raise TransportClosed(f"the client of {self.endpoint} is closed")
        if self._socket is not None:
            return
        check_environment()
        self._state, self._failure = "connecting", ""
        self._inbox = Inbox(self.options.hwm)
        self._ctx = zmq.Context()
        try:
            self._dial()
            async with asyncio.timeout(self.connect_timeout_s):
                while self._state not in ("up", "refused"):
                    self._changed.clear()
                    await self._changed.wait()
            if self._state == "refused":
                raise AccessDenied(f"the cell at {self.endpoint} refused this client's key")
        except BaseException as exc:
            self._teardown()
            if isinstance(exc, TimeoutError) and self._failure == SILENT:
                raise CellUnreachable(
                    f"no handshake with the cell at {self.endpoint} within "
                    f"{self.connect_timeout_s:g} s: {SILENT}; try again"
                ) from None
            if isinstance(exc, TimeoutError):
                why = f" ({self._failure})" if self._failure else ""
                raise CellUnreachable(
                    f"no handshake with the cell at {self.endpoint} within "
                    f"{self.connect_timeout_s:g} s{why}: is a cell listening there (its api "
                    "endpoint), and is the server key that cell's public key?"
                ) from None
            if isinstance(exc, zmq.ZMQError | UnicodeError):
                raise TransportBroken(f"cannot dial {self.endpoint}: {exc}") from exc
            raise

    def _dial(self) -> None:
        """A new DEALER, with a new routing id, its monitor and their pumps; then connect."""
        assert self._ctx is not None
        self._socket = sock = self._ctx.socket(zmq.DEALER)
        self.options.dialler(sock, self.server_key, self._keypair)
        self._monitor = sock.get_monitor_socket(MONITORED)
        self._pumps.append(Pump(self._monitor, self._on_monitor, self._failed))
        self._pumps.append(Pump(sock, self._on_message, self._failed, inbox=self._inbox))
        sock.connect(self.endpoint)

    def _redial(self) -> None:
        """The link went down: libzmq does not dial again after some drops (an oversize
        frame ends the session for good), so a new socket does, whatever the cause."""
        if self._closed or self._socket is None or self._state != "down":
            return
        self._close_socket()
        try:
            self._dial()
        except (zmq.ZMQError, UnicodeError) as exc:
            self._failed("redial", exc)

    def _on_monitor(self, frames: list[Any], count: int) -> None:
        change = next_state(self._state, *monitor_event(frames, count))
        if change is not None:
            self._state = change[0]
            self._failure = change[1] if change[0] == "failed" else self._failure
            self._changed.set()
            if self._state == "down":
                asyncio.get_running_loop().call_soon(self._redial)

    def _on_message(self, frames: list[Any], count: int) -> None:
        if count != codec.FRAMES_PER_MESSAGE:
            expected = codec.FRAMES_PER_MESSAGE
            self._inbox.put(FrameError(f"expected {expected} frames, got {count}"))
        else:
            self._inbox.put(frames)

    def _failed(self, what: str, exc: Exception) -> None:
        logs.event(
            log,
            logging.ERROR,
            f"client.{what}_failed",
            where=self.endpoint,
            error=type(exc).__name__,
        )

    def _live(self) -> Socket:
        if self._closed:
            raise TransportClosed(f"the client of {self.endpoint} is closed")
        if self._socket is None:
            raise CellUnreachable(f"not connected to {self.endpoint}")
        return self._socket

    async def send(self, message: Message) -> None:
        sock = self._live()
        try:
            send_now(sock, codec.encode_within(message, self.options.max_frame_bytes))
        except zmq.Again:
            if self._state != "up":
                raise CellUnreachable(f"no live link to {self.endpoint}") from None
            raise Busy(f"the queue to {self.endpoint} is full") from None
        except zmq.ZMQError as exc:
            raise TransportBroken(f"sending to {self.endpoint} failed: {exc.strerror}") from exc
        finally:
            self._pumps[-1].poke()

    async def recv(self) -> Message:
        self._live()
        frames = await self._inbox.get()
        if frames is None:  # closed under us
            raise TransportClosed(f"the client of {self.endpoint} closed")
        if isinstance(frames, FrameError):
            raise frames
        return codec.decode(frames, self.options.max_frame_bytes)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._teardown()
            self._inbox.end()

    def _close_socket(self) -> None:
        for pump in self._pumps:
            pump.stop()
        if self._socket is not None:
            close_socket(self._socket, self._monitor, self.options.linger_ms)
        self._socket = self._monitor = None
        self._pumps = []

    def _teardown(self) -> None:
        self._close_socket()
        if self._ctx is not None:
            self._ctx.destroy(linger=self.options.linger_ms)
        self._ctx = None
        self._state = "closed"
