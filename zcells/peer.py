"""Who is on the other end of a link, as established by its key.

A peer's name comes only from the authenticated ZAP User-Id (or, for a parent
we dial, from the server key we pinned); never from anything it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    PARENT = "parent"
    CHILD = "child"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class Peer:
    role: Role
    name: str

    def __str__(self) -> str:
        return f"{self.role.value}:{self.name}"
