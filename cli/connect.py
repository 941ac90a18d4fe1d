"""How client commands reach a cell: endpoint, the cell's public key, the client's own key."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from zcells.client import CellClient
from zcells.errors import KeyFileError, ValidationError
from zcells.names import check_endpoint
from zcells.sockets.keys import SECRET_SUFFIX, check_public_key, load_keypair, read_public_key
from zcells.sockets.transport import ZmqClient

T = TypeVar("T")

Endpoint = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        envvar="ZCELLS_ENDPOINT",
        show_envvar=True,
        help="The cell's api endpoint, e.g. tcp://127.0.0.1:7751.",
    ),
]
ServerKey = Annotated[
    str | None,
    typer.Option(
        "--server-key",
        envvar="ZCELLS_SERVER_KEY",
        show_envvar=True,
        help="The cell's public key: Z85 text or a path to its .key file.",
    ),
]
ClientKey = Annotated[
    Path | None,
    typer.Option(
        "--key",
        envvar="ZCELLS_KEY",
        show_envvar=True,
        help="This client's secret key file (NAME.key_secret).",
    ),
]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the answer.")]


@dataclass(frozen=True)
class Target:
    endpoint: str
    server_key: str
    public_key: str
    secret_key: str


def resolve(endpoint: str | None, server_key: str | None, key: Path | None) -> Target:
    """Check the three connection settings and load the client's key pair."""
    if not endpoint:
        raise ValidationError("endpoint", "", "--endpoint or ZCELLS_ENDPOINT (tcp://HOST:PORT)")
    check_endpoint("endpoint", endpoint)
    if not server_key:
        raise ValidationError("server key", "", "--server-key or ZCELLS_SERVER_KEY")
    server_path = Path(server_key).expanduser()
    if len(server_key) != 40 and server_path.exists():
        server_key = read_public_key(server_path.parent, server_path.name.removesuffix(".key"))
    check_public_key(server_key, "server key")
    if key is None:
        raise ValidationError("client key", "", "--key or ZCELLS_KEY (a NAME.key_secret file)")
    key = key.expanduser()
    if not key.name.endswith(SECRET_SUFFIX):
        raise KeyFileError(
            str(key),
            f"a client secret key file ends in {SECRET_SUFFIX}",
            "pass the NAME.key_secret file written by `zcells keys gen`",
        )
    pair = load_keypair(key.parent, key.name.removesuffix(SECRET_SUFFIX))
    return Target(endpoint, server_key, pair.public, pair.secret)


def client_for(target: Target, timeout_s: float) -> CellClient:
    transport = ZmqClient(
        target.endpoint,
        target.server_key,
        (target.public_key, target.secret_key),
        connect_timeout_s=min(timeout_s, 5.0),
    )
    return CellClient(transport, timeout_s=timeout_s)


async def with_client(
    target: Target, timeout_s: float, work: Callable[[CellClient], Awaitable[T]]
) -> T:
    async with client_for(target, timeout_s) as client:
        return await work(client)


def ask(
    target: Target, timeout_s: float, method: str, body: Mapping[str, Any] | None = None
) -> Any:
    """One request from a command to the connected cell: the value it answered."""
    return asyncio.run(with_client(target, timeout_s, lambda c: c.request(method, body)))
