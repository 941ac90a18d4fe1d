"""Handlers of the methods a message can reach, one class per area.

Every public method of a handler class (other than `methods`, which lists
them) is a wire method and must be in the table `build_methods` returns; a
test checks both directions.
"""

from __future__ import annotations

from typing import Protocol

from zcells.handlers.catalog import CatalogHandlers
from zcells.handlers.compute import ComputeHandlers
from zcells.handlers.diag import DiagHandlers
from zcells.handlers.scheduling import SchedulingHandlers
from zcells.handlers.servers import ServerHandlers
from zcells.handlers.state import StateHandlers
from zcells.handlers.status import StatusHandlers
from zcells.methods import Method, MethodTable

HANDLER_CLASSES = (
    DiagHandlers,
    StateHandlers,
    ComputeHandlers,
    ServerHandlers,
    StatusHandlers,
    SchedulingHandlers,
    CatalogHandlers,
)


class Handlers(Protocol):
    def methods(self) -> list[Method]: ...


def build_methods(*handlers: Handlers) -> MethodTable:
    return MethodTable(method for group in handlers for method in group.methods())
