"""Handlers of the methods a message can reach, one class per area.

Every public method of a handler class (other than `methods`, which lists
them) is a wire method and must be in the table `build_methods` returns; a
test checks both directions.
"""

from __future__ import annotations

from zcells.handlers.diag import DiagHandlers
from zcells.methods import Method, MethodTable

HANDLER_CLASSES = (DiagHandlers,)


def build_methods(diag: DiagHandlers) -> MethodTable:
    methods: list[Method] = [*diag.methods()]
    return MethodTable(methods)
