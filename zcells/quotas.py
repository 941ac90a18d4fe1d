"""Quotas: how much each project may hold at once, as nova counts it.

Rules kept here (pure; `zcells.db.quotas` stores and counts):

* Three resources, counted over a project's servers that are not deleted:
  ``servers``, ``vcpus`` and ``ram_mb``. Their defaults are nova's (10, 20,
  51,200) and come from ``[quota]``; an admin may set any of them per
  project, and -1 means no limit.
* A create is checked against what the project holds when it is written, in
  the same transaction, so two creates at once cannot both slip under a
  limit. A request the top has seen before answers as it did, without a
  new check.
* Admins are not limited unless ``[quota] limit_admins`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Final

from zcells.errors import QuotaExceeded

RESOURCES: Final = ("servers", "vcpus", "ram_mb")
UNLIMITED: Final = -1
MAX_LIMIT: Final = 1 << 40


@dataclass(frozen=True)
class Quota:
    """A project's limit on each resource; -1 for none."""

    servers: int
    vcpus: int
    ram_mb: int

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def merged(self, overrides: Mapping[str, int]) -> Quota:
        """These limits with a project's own in place of the defaults."""
        return Quota(**{**self.as_dict(), **{k: v for k, v in overrides.items() if k in RESOURCES}})


@dataclass(frozen=True)
class Usage:
    """What a project holds now (servers that are not deleted)."""

    servers: int = 0
    vcpus: int = 0
    ram_mb: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def plus(self, other: Usage) -> Usage:
        return Usage(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, int, int]:
        return (self.servers, self.vcpus, self.ram_mb)


def check_limit(resource: str, value: int) -> int:
    """An admin's limit for `resource`: -1 (none) or 0 up to `MAX_LIMIT`."""
    if resource not in RESOURCES:
        raise ValueError(f"no quota {resource!r}; quotas are {', '.join(RESOURCES)}")
    if type(value) is not int or not UNLIMITED <= value <= MAX_LIMIT:
        raise ValueError(f"quota {resource} must be -1 (no limit) or 0 to {MAX_LIMIT}")
    return value


def enforce(project: str, quota: Quota, held: Usage, wanted: Usage) -> None:
    """`QuotaExceeded` naming the first resource `wanted` would take past its limit."""
    after = held.plus(wanted)
    for resource in RESOURCES:
        limit = getattr(quota, resource)
        if limit != UNLIMITED and getattr(after, resource) > limit:
            raise QuotaExceeded(
                f"quota exceeded for project {project}: {resource} limit {limit}, "
                f"in use {getattr(held, resource)}, requested {getattr(wanted, resource)}"
            )
