"""Plain records that cross the boundary between the database and the rest of zcells.

The database layer returns these frozen dataclasses, never ORM objects, so that
nothing outside ``zcells.db`` depends on SQLAlchemy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Neighbour:
    """A row of the ``cells`` table: a parent or child cell this cell talks to."""

    name: str
    kind: str  # "parent" | "child"
    endpoint: str
    public_key: str
    weight_offset: float = 0.0
    weight_scale: float = 1.0
    disabled: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "endpoint": self.endpoint,
            "public_key": self.public_key,
            "weight_offset": self.weight_offset,
            "weight_scale": self.weight_scale,
            "disabled": self.disabled,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


@dataclass(frozen=True)
class Client:
    """A row of the ``clients`` table: a key allowed on the api endpoint, with a role."""

    name: str
    public_key: str
    role: str  # "admin" | "member" | "reader"
    project: str | None = None
    created_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "public_key": self.public_key,
            "role": self.role,
            "project": self.project,
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True)
class Flavor:
    name: str
    memory_mb: int
    disk_gb: int
    vcpus: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_mb": self.memory_mb,
            "disk_gb": self.disk_gb,
            "vcpus": self.vcpus,
        }


@dataclass(frozen=True)
class Image:
    """A row of the ``images`` table: an image servers boot from, and its properties.

    Properties are free text; the cell scheduler reads `hypervisor_type`,
    `architecture` and `hypervisor_version_requires` (``zcells.cellfilters``).
    """

    name: str
    properties: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "properties": dict(sorted(self.properties.items()))}


@dataclass(frozen=True)
class Host:
    """A compute host of this cell: its size and what instances have claimed of it."""

    name: str
    enabled: bool
    memory_mb: int
    disk_gb: int
    vcpus: int
    memory_mb_used: int = 0
    disk_gb_used: int = 0
    vcpus_used: int = 0

    @functools.cached_property
    def free(self) -> Resources:
        # Cached: every filter and the weigher ask for it, for every host, for every build.
        return Resources(
            self.memory_mb - self.memory_mb_used,
            self.disk_gb - self.disk_gb_used,
            self.vcpus - self.vcpus_used,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "enabled": self.enabled,
            "memory_mb": self.memory_mb,
            "memory_mb_used": self.memory_mb_used,
            "disk_gb": self.disk_gb,
            "disk_gb_used": self.disk_gb_used,
            "vcpus": self.vcpus,
            "vcpus_used": self.vcpus_used,
        }


@dataclass(frozen=True)
class Resources:
    """An amount of RAM (MB), disk (GB) and vCPUs: what a flavor needs, what a host has free."""

    memory_mb: int
    disk_gb: int
    vcpus: int

    def fits_in(self, other: Resources) -> bool:
        return (
            self.memory_mb <= other.memory_mb
            and self.disk_gb <= other.disk_gb
            and self.vcpus <= other.vcpus
        )


# The classic flavors an API cell starts with: name, RAM (MB), disk (GB), vCPUs.
DEFAULT_FLAVORS: tuple[Flavor, ...] = (
    Flavor("m1.tiny", 512, 1, 1),
    Flavor("m1.small", 2048, 20, 1),
    Flavor("m1.medium", 4096, 40, 2),
    Flavor("m1.large", 8192, 80, 4),
    Flavor("m1.xlarge", 16384, 160, 8),
)


# The image an API cell starts with: what `zcells dev`, the simulation and the demos boot.
DEFAULT_IMAGES: tuple[Image, ...] = (Image("cirros"),)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
