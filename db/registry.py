"""The neighbour and client registries of a cell (flavors: `zcells.db.catalog`).

Rules kept here:

* Every value is checked before anything is written; a rejected call writes
  nothing.
* A public key identifies exactly one peer: it is unique across the cells
  and clients tables together, because the key is the identity on the wire.
* Callers get `zcells.records` dataclasses back, never ORM rows.
"""

from __future__ import annotations

import math

from sqlalchemy import select
from sqlalchemy.orm import Session
from zcells.db import catalog
from zcells.db.engine import Database
from zcells.db.models import CellRow, ClientRow

from zcells.errors import AlreadyExists, NotFound, ValidationError
from zcells.names import NEIGHBOUR_KINDS, ROLES, check_choice, check_endpoint, check_name
from zcells.records import Client, Neighbour
from zcells.sockets.keys import check_public_key


def _finite(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(field, value, "a finite number")
    return float(value)


def _neighbour(row: CellRow) -> Neighbour:
    return Neighbour(
        name=row.name,
        kind=row.kind,
        endpoint=row.endpoint,
        public_key=row.public_key,
        weight_offset=row.weight_offset,
        weight_scale=row.weight_scale,
        disabled=row.disabled,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _client(row: ClientRow) -> Client:
    return Client(
        name=row.name,
        public_key=row.public_key,
        role=row.role,
        project=row.project,
        created_at=row.created_at,
    )


def _ensure_key_unused(
    session: Session,
    public_key: str,
    *,
    except_cell: str | None = None,
    except_client: str | None = None,
) -> None:
    cell = session.scalar(select(CellRow.name).where(CellRow.public_key == public_key))
    if cell is not None and cell != except_cell:
        raise AlreadyExists("cell", "public key", public_key)
    client = session.scalar(select(ClientRow.name).where(ClientRow.public_key == public_key))
    if client is not None and client != except_client:
        raise AlreadyExists("client", "public key", public_key)


# -- neighbours ------------------------------------------------------------------------


def add_cell(
    db: Database,
    name: str,
    *,
    kind: str,
    endpoint: str,
    public_key: str,
    weight_offset: float = 0.0,
    weight_scale: float = 1.0,
    disabled: bool = False,
) -> Neighbour:
    row = CellRow(
        name=check_name("cell name", name),
        kind=check_choice("kind", kind, NEIGHBOUR_KINDS),
        endpoint=check_endpoint("endpoint", endpoint),
        public_key=check_public_key(public_key),
        weight_offset=_finite("weight offset", weight_offset),
        weight_scale=_finite("weight scale", weight_scale),
        disabled=bool(disabled),
    )
    with db.write() as session:
        if session.scalar(select(CellRow.id).where(CellRow.name == name)) is not None:
            raise AlreadyExists("cell", "name", name)
        _ensure_key_unused(session, public_key)
        if row.kind == "parent":
            parent = session.scalar(select(CellRow.name).where(CellRow.kind == "parent"))
            if parent is not None:
                raise ValidationError(
                    "kind",
                    "parent",
                    f"one parent per cell: {parent} is this cell's parent already. A cell "
                    "with two parents would report each server twice; to move this cell, "
                    f"remove {parent} first (`zcells cell remove {parent}`)",
                )
        session.add(row)
        session.flush()
        return _neighbour(row)


def list_cells(db: Database) -> list[Neighbour]:
    with db.read() as session:
        rows = session.scalars(select(CellRow).order_by(CellRow.kind.desc(), CellRow.name))
        return [_neighbour(row) for row in rows]


def get_cell(db: Database, name: str) -> Neighbour:
    with db.read() as session:
        row = session.scalar(select(CellRow).where(CellRow.name == name))
        if row is None:
            raise NotFound("cell", name)
        return _neighbour(row)


def update_cell(
    db: Database,
    name: str,
    *,
    endpoint: str | None = None,
    public_key: str | None = None,
    weight_offset: float | None = None,
    weight_scale: float | None = None,
    disabled: bool | None = None,
) -> Neighbour:
    if endpoint is not None:
        check_endpoint("endpoint", endpoint)
    if public_key is not None:
        check_public_key(public_key)
    if weight_offset is not None:
        weight_offset = _finite("weight offset", weight_offset)
    if weight_scale is not None:
        weight_scale = _finite("weight scale", weight_scale)
    with db.write() as session:
        row = session.scalar(select(CellRow).where(CellRow.name == name))
        if row is None:
            raise NotFound("cell", name)
        if public_key is not None:
            _ensure_key_unused(session, public_key, except_cell=name)
            row.public_key = public_key
        if endpoint is not None:
            row.endpoint = endpoint
        if weight_offset is not None:
            row.weight_offset = weight_offset
        if weight_scale is not None:
            row.weight_scale = weight_scale
        if disabled is not None:
            row.disabled = disabled
        session.flush()
        return _neighbour(row)


def remove_cell(db: Database, name: str) -> None:
    with db.write() as session:
        row = session.scalar(select(CellRow).where(CellRow.name == name))
        if row is None:
            raise NotFound("cell", name)
        session.delete(row)


def snapshot(db: Database) -> tuple[list[Neighbour], list[Client]]:
    """Neighbours and clients read in one transaction, for the daemon's keyring."""
    with db.read() as session:
        cells = session.scalars(select(CellRow).order_by(CellRow.kind.desc(), CellRow.name))
        neighbours = [_neighbour(row) for row in cells]
        clients = [_client(r) for r in session.scalars(select(ClientRow).order_by(ClientRow.name))]
    return neighbours, clients


# -- clients ---------------------------------------------------------------------------


def add_client(
    db: Database, name: str, *, public_key: str, role: str, project: str | None = None
) -> Client:
    check_name("client name", name)
    check_public_key(public_key)
    check_choice("role", role, ROLES)
    if role == "member" and not project:
        raise ValidationError("project", project, "a project name for a member client")
    if project is not None:
        check_name("project", project)
    row = ClientRow(name=name, public_key=public_key, role=role, project=project)
    with db.write() as session:
        if session.scalar(select(ClientRow.id).where(ClientRow.name == name)) is not None:
            raise AlreadyExists("client", "name", name)
        _ensure_key_unused(session, public_key)
        session.add(row)
        session.flush()
        return _client(row)


def list_clients(db: Database) -> list[Client]:
    with db.read() as session:
        return [_client(r) for r in session.scalars(select(ClientRow).order_by(ClientRow.name))]


def remove_client(db: Database, name: str) -> None:
    with db.write() as session:
        row = session.scalar(select(ClientRow).where(ClientRow.name == name))
        if row is None:
            raise NotFound("client", name)
        session.delete(row)


# -- flavors ---------------------------------------------------------------------------

# Flavors are global data, kept with images and the log that sends them down
# (`zcells.db.catalog`); their names stay here for the callers of the registry.
create_flavor = catalog.create_flavor
list_flavors = catalog.list_flavors
seed_default_flavors = catalog.seed_default_flavors
