"""CURVE authentication for a cell's listening sockets: the keyring and the ZAP handler.

Rules kept here (SECURITY.md §0 rules 1-3, §1.2):

* A key is admitted only in its own ZAP domain: ``cells`` admits the cell's
  children, ``api`` admits its clients. Keys are unique across roles; a key
  that shows up under two names is admitted under neither.
* The User-Id handed to libzmq is ``cell:<name>:<z85 key>`` or
  ``api:<name>:<z85 key>``. The key is part of it so the transport's
  per-message check (`Keyring.peer`) can tell a key that was removed, or replaced under the
  same name, from one that is still registered.
* The ZAP callback and `ZapHandler.curve_user_id` never raise and never block:
  they read an immutable in-memory `Keyring`, swapped whole (one attribute
  assignment) when the topology changes. Nothing here touches the database.
* Any failure while answering a ZAP request is answered with status 500.
  pyzmq's ZAP loop has no try/except: one exception would kill it and leave
  every later handshake, valid ones included, hanging unanswered.
* Anything but a parseable User-Id is refused, and every refusal is logged
  with its domain, key and peer address. `CURVE_ALLOW_ANY` is never used: it
  is one global flag that would open every domain at once.

Why a thread: pyzmq's `ThreadAuthenticator` answers ZAP requests in a thread
of its own, with its own event loop, so handshakes are answered even while
the cell's event loop is busy, and a slow step on that loop cannot stall
authentication (SECURITY.md §1.2). The thread touches nothing but its ZAP
socket and the current keyring snapshot.

`SocketOptions` is the other half of the handshake rules: the CURVE, ZAP and
size bounds every socket gets before it binds or connects (SECURITY.md §1.2).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from zcells import codec, logs
from zcells.peer import Peer, Role
from zcells.sockets.ids import new_routing_id
from zcells.transport import Topology

log = logs.get_logger("sockets.auth")

# ZAP domain -> the User-Id prefix of the keys it admits.
DOMAIN_PREFIX: Final[Mapping[str, str]] = MappingProxyType({"cells": "cell", "api": "api"})
Z85_KEY_LENGTH: Final = 40
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_UNKNOWN_REQUEST: Final = ("?", "?", "?")
MAX_HEARTBEAT_TTL_MS: Final = 6_553_599  # libzmq's limit


@dataclass(frozen=True)
class SocketOptions:
    """What every socket gets before it binds or connects: bounds, heartbeats, CURVE, ZAP."""

    max_frame_bytes: int = codec.DEFAULT_MAX_FRAME_BYTES  # MAXMSGSIZE applies per frame
    hwm: int = 1000
    linger_ms: int = 500  # finite, so closing a context never hangs on a dead peer
    heartbeat_ivl_ms: int = 5000
    heartbeat_timeout_ms: int = 15000
    handshake_ivl_ms: int = 5000  # a silent or garbage connection is closed after this
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 2000

    def __post_init__(self) -> None:
        if self.hwm < 2:  # 0 would be unbounded; libzmq 4.3.5 never delivers to a CURVE
            raise ValueError("hwm must be at least 2")  # ROUTER whose RCVHWM is 1

    def _bounds(self, sock: zmq.Socket[Any]) -> None:
        ttl = min(self.heartbeat_timeout_ms, MAX_HEARTBEAT_TTL_MS)
        for option, value in (
            (zmq.MAXMSGSIZE, self.max_frame_bytes),
            (zmq.SNDHWM, self.hwm),
            (zmq.RCVHWM, self.hwm),
            (zmq.LINGER, self.linger_ms),
            (zmq.HANDSHAKE_IVL, self.handshake_ivl_ms),
            (zmq.HEARTBEAT_IVL, self.heartbeat_ivl_ms),
            (zmq.HEARTBEAT_TIMEOUT, self.heartbeat_timeout_ms),
            (zmq.HEARTBEAT_TTL, ttl),
        ):
            sock.setsockopt(option, value)

    def listener(self, sock: zmq.Socket[Any], domain: str, secret_key: str) -> None:
        """A CURVE server that only ZAP can admit to, and whose sends never drop silently."""
        self._bounds(sock)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode("ascii"))
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode("ascii"))
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never admit
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)

    def dialler(self, sock: zmq.Socket[Any], server_key: str, keypair: tuple[str, str]) -> None:
        """A CURVE client with the server's key pinned, queueing only on completed links."""
        self._bounds(sock)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair[0].encode("ascii"))
        sock.setsockopt(zmq.CURVE_SECRETKEY, keypair[1].encode("ascii"))
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.ROUTING_ID, new_routing_id())  # unguessable (zcells.sockets.ids)
        sock.setsockopt(zmq.RECONNECT_IVL, self.reconnect_ivl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.reconnect_ivl_max_ms)


def parse_user_id(text: str) -> tuple[str, str, str] | None:
    """Split ``cell:<name>:<key>`` / ``api:<name>:<key>`` into (prefix, name, key); None if not one.

    Names never contain ``:``, so the first two colons are the separators;
    the key itself may contain ``:`` (it is in the Z85 alphabet).
    """
    parts = text.split(":", 2)
    if len(parts) != 3:
        return None
    prefix, name, key = parts
    if prefix not in DOMAIN_PREFIX.values() or not _NAME_RE.fullmatch(name):
        return None
    if len(key) != Z85_KEY_LENGTH or not key.isascii():
        return None
    return prefix, name, key


@dataclass(frozen=True)
class Keyring:
    """An immutable snapshot of the keys this cell admits: z85 key -> User-Id."""

    by_key: Mapping[bytes, str] = field(default_factory=lambda: MappingProxyType({}))
    # User-Id -> who it is, parsed once per keyring rather than once per message.
    by_user: Mapping[str, Peer] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_topology(cls, topology: Topology) -> Keyring:
        """Children become ``cell:`` users, clients ``api:`` users; a key claimed twice, neither."""
        entries: dict[bytes, str] = {}
        claimed_twice: set[bytes] = set()
        roles = (("cell", topology.children), ("api", topology.clients))
        for prefix, names in roles:
            for name, key in names.items():
                if len(key) != Z85_KEY_LENGTH or not key.isascii():
                    logs.event(log, logging.ERROR, "keyring.bad_key", user=name, role=prefix)
                    continue
                raw = key.encode("ascii")
                if raw in entries:
                    claimed_twice.add(raw)
                entries[raw] = f"{prefix}:{name}:{key}"
        for raw in claimed_twice:
            del entries[raw]
            logs.event(log, logging.ERROR, "keyring.duplicate_key", key=raw.decode("ascii"))
        users = {}
        for user_id in entries.values():
            prefix, name, _ = user_id.split(":", 2)
            users[user_id] = Peer(Role.CHILD if prefix == "cell" else Role.CLIENT, name)
        return cls(MappingProxyType(entries), MappingProxyType(users))

    def __len__(self) -> int:
        return len(self.by_key)

    def user_id(self, z85_key: bytes) -> str | None:
        """The User-Id registered for this key, or None."""
        return self.by_key.get(bytes(z85_key))

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """pyzmq's credentials hook: True only for a key registered in this very domain."""
        try:
            want = DOMAIN_PREFIX.get(domain)
            found = self.user_id(z85_key)
            return want is not None and found is not None and found.startswith(want + ":")
        except Exception:  # never raise into the ZAP loop
            return False

    def peer(self, user_id: str) -> Peer | None:
        """Who `user_id` is, if its key still maps to exactly it; None for a stale one.

        One lookup, cheap enough for every message: a key removed, or replaced
        under the same name, no longer matches.
        """
        return self.by_user.get(user_id)


class _CurrentKeyring:
    """What pyzmq calls for each CURVE handshake: the handler's keyring of the moment."""

    def __init__(self, handler: ZapHandler) -> None:
        self._handler = handler

    def callback(self, domain: str, z85_key: bytes) -> bool:
        return self._handler.snapshot.callback(domain, z85_key)


class ZapHandler(ThreadAuthenticator):
    """The ZAP handler of one context: admits registered keys, refuses and logs the rest."""

    def __init__(self, context: zmq.Context[Any], keyring: Keyring | None = None) -> None:
        super().__init__(context, log=logs.get_logger("sockets.zap"))
        self.keyring = keyring if keyring is not None else Keyring()
        # The keyring one request is judged by, so its callback and its User-Id agree
        # even if `set_keyring` runs in between. Only the ZAP thread writes it.
        self.snapshot = self.keyring
        self.refused = 0  # written by the ZAP thread only
        self._request = _UNKNOWN_REQUEST  # (domain, address, key) of the request being answered
        provider = _CurrentKeyring(self)
        for domain in DOMAIN_PREFIX:
            self.configure_curve_callback(domain, provider)

    def set_keyring(self, keyring: Keyring) -> None:
        """Swap in a new snapshot; one assignment, so the ZAP thread sees old or new, never half."""
        self.keyring = keyring

    def curve_user_id(self, client_public_key: bytes) -> str:
        try:
            return self.snapshot.user_id(z85.encode(client_public_key)) or ""
        except Exception:  # never raise into the ZAP loop; an empty User-Id is refused
            return ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.snapshot = self.keyring
        self._request = _describe(msg)
        try:
            await super().handle_zap_message(msg)
        except Exception as exc:
            domain, address, key = self._request
            logs.event(
                log,
                logging.ERROR,
                "zap.failed",
                error=type(exc).__name__,
                domain=domain,
                key=key,
                address=address,
            )
            if len(msg) >= 2:
                try:
                    self._send_zap_reply(msg[1], b"500", b"Internal error")
                except Exception as reply_exc:  # e.g. a reply already went out
                    logs.event(
                        log, logging.ERROR, "zap.reply_failed", error=type(reply_exc).__name__
                    )

    def _send_zap_reply(
        self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous"
    ) -> None:
        """Every reply passes here: refuse an admission without a User-Id, log each refusal."""
        if status_code == b"200" and (
            not isinstance(user_id, str) or parse_user_id(user_id) is None
        ):
            status_code, status_text = b"400", b"No user id"
        if status_code != b"200":
            self.refused += 1
            domain, address, key = self._request
            logs.limited(
                log,
                logging.WARNING,
                "zap.refused",
                address,
                domain=domain,
                key=key,
                address=address,
                status=status_code.decode("ascii", "replace"),
                reason=status_text.decode("ascii", "replace"),
            )
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def _describe(msg: list[bytes]) -> tuple[str, str, str]:
    """(domain, peer address, z85 key) of a ZAP request, for logs; never raises."""
    try:
        domain = msg[2].decode("ascii", "replace")[:32]
        address = msg[3].decode("ascii", "replace")[:64]
        key = z85.encode(msg[6]).decode("ascii") if len(msg) > 6 and len(msg[6]) == 32 else "?"
    except Exception:
        return _UNKNOWN_REQUEST
    return domain, address, key
