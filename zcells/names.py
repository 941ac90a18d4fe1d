"""Validation of the names and addresses an operator types.

Rules kept here:

* A cell or client name is 1-64 characters of ``[A-Za-z0-9_.-]``. It never
  contains the path separator ``!``, so a full cell path splits unambiguously,
  and with its ``cell:``/``api:`` prefix it always fits a ZAP User-Id (255).
* A full cell path is names joined by ``!``, top first: ``api!eu!eu-1``.
* A neighbour endpoint is ``tcp://HOST:PORT`` (HOST a DNS name, an IPv4
  address or a bracketed IPv6 address) or ``ipc:///absolute/path``.
* A bind endpoint may also use ``*`` or ``0.0.0.0`` as HOST.

Every check returns the value it accepted (normalised) or raises
`ValidationError` naming the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from zcells.errors import ValidationError

PATH_SEPARATOR = "!"
NAME_MAX_LENGTH = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
NAME_EXPECTED = "1-64 characters of letters, digits, '_', '.' or '-' (no '!')"

ROLES = ("admin", "member", "reader")
NEIGHBOUR_KINDS = ("parent", "child")


def child_path(parent: str, name: str) -> str:
    """The full path of cell `name` under the cell at `parent`."""
    return f"{parent}{PATH_SEPARATOR}{name}"


def join_path(names: Iterable[str]) -> str:
    """Names (or paths) joined into one path, as a routing path is shown."""
    return PATH_SEPARATOR.join(names)


def last_name(path: str) -> str:
    """The name of the cell at `path`."""
    return path.rpartition(PATH_SEPARATOR)[2]


def check_name(field: str, value: str) -> str:
    """Accept a cell or client name."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValidationError(field, value, NAME_EXPECTED)
    return value


def check_cell_path(value: str) -> tuple[str, ...]:
    """Split a full cell path (``api!eu!eu-1``) into its names."""
    if not isinstance(value, str) or not value:
        raise ValidationError("cell path", value, "names joined by '!', e.g. api!eu!eu-1")
    parts = tuple(value.split(PATH_SEPARATOR))
    for part in parts:
        if not _NAME_RE.fullmatch(part):
            raise ValidationError("cell path", value, f"names joined by '!', each {NAME_EXPECTED}")
    return parts


def join_cell_path(parts: tuple[str, ...] | list[str]) -> str:
    return PATH_SEPARATOR.join(parts)


def check_choice(field: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValidationError(field, value, "one of " + ", ".join(choices))
    return value


def check_endpoint(field: str, value: str, *, bind: bool = False) -> str:
    """Accept a ZeroMQ endpoint a neighbour can connect to (or a cell bind to)."""
    expected = "tcp://HOST:PORT or ipc:///absolute/path"
    if bind:
        expected = "tcp://HOST:PORT (HOST may be * or 0.0.0.0) or ipc:///absolute/path"
    if not isinstance(value, str):
        raise ValidationError(field, value, expected)
    if value.startswith("ipc://"):
        path = value[len("ipc://") :]
        if not path.startswith("/") or len(path) > 100 or "\x00" in path:
            raise ValidationError(
                field, value, "ipc:// followed by an absolute path of <= 100 bytes"
            )
        return value
    if not value.startswith("tcp://"):
        raise ValidationError(field, value, expected)
    hostport = value[len("tcp://") :]
    host, sep, port_text = hostport.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValidationError(field, value, expected + " with PORT 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValidationError(field, value, "a valid IPv6 address in brackets") from None
        return value
    if host == "*":
        if not bind:
            raise ValidationError(field, value, "a host to connect to, not '*'")
        return value
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host) or host.replace(".", "").isdigit():
            raise ValidationError(field, value, expected + " with a valid HOST") from None
    return value
