"""Instances: the record every cell keeps, its states, and how actions move it.

Pure: no I/O and no clock of its own (every change is given `now`).

Rules kept here:

* States are nova's three: `vm_state` (what the instance is), `task_state`
  (what is being done to it, or None) and `power_state` (what the hypervisor
  says). The status a user sees (BUILD, ACTIVE, ...) is derived from them.
* Only the owning cell changes an instance, and every change raises its
  `version` by one. A parent keeps whatever it holds unless an update carries
  a higher version, so updates may arrive twice or out of order.
* A delete is a tombstone: the record stays, `vm_state` deleted, with a
  version, so that the delete itself flows up like any other change.
* An action starts only from the states nova allows it from (`Conflict`
  otherwise), and one action runs at a time.
* Anything taken from the wire goes through `fields_from_wire` (by itself,
  or under `Instance.from_wire`), which checks every field and refuses extra
  ones (`SchemaError`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final, NamedTuple

from zcells.errors import Conflict, SchemaError, ValidationError
from zcells.names import check_cell_path, check_name

MAX_TEXT_LENGTH: Final = 255
MAX_METADATA_ITEMS: Final = 64


class VmState(StrEnum):
    BUILDING = "building"
    ACTIVE = "active"
    STOPPED = "stopped"
    ERROR = "error"
    DELETED = "deleted"


class TaskState(StrEnum):
    SCHEDULING = "scheduling"
    SPAWNING = "spawning"
    POWERING_OFF = "powering-off"
    POWERING_ON = "powering-on"
    REBOOTING = "rebooting"
    DELETING = "deleting"


class PowerState(StrEnum):
    NOSTATE = "nostate"
    RUNNING = "running"
    SHUTDOWN = "shutdown"


class Action(StrEnum):
    STOP = "stop"
    START = "start"
    REBOOT = "reboot"
    DELETE = "delete"


STATUSES: Final = ("BUILD", "ACTIVE", "SHUTOFF", "REBOOT", "ERROR", "DELETED")

# action -> (vm states it may start from, the task it sets)
_STARTS: Final[Mapping[Action, tuple[frozenset[VmState], TaskState]]] = {
    Action.STOP: (frozenset({VmState.ACTIVE}), TaskState.POWERING_OFF),
    Action.START: (frozenset({VmState.STOPPED}), TaskState.POWERING_ON),
    Action.REBOOT: (frozenset({VmState.ACTIVE}), TaskState.REBOOTING),
    Action.DELETE: (
        frozenset({VmState.BUILDING, VmState.ACTIVE, VmState.STOPPED, VmState.ERROR}),
        TaskState.DELETING,
    ),
}
# task being finished -> (vm state, power state) once it is done
_FINISHES: Final[Mapping[TaskState, tuple[VmState, PowerState]]] = {
    TaskState.SPAWNING: (VmState.ACTIVE, PowerState.RUNNING),
    TaskState.POWERING_OFF: (VmState.STOPPED, PowerState.SHUTDOWN),
    TaskState.POWERING_ON: (VmState.ACTIVE, PowerState.RUNNING),
    TaskState.REBOOTING: (VmState.ACTIVE, PowerState.RUNNING),
    TaskState.DELETING: (VmState.DELETED, PowerState.NOSTATE),
}


@dataclass(frozen=True)
class Fault:
    """Why an instance is in error: a wire error code, its message, and the cell that said so."""

    code: str
    message: str
    cell: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "cell": self.cell}


@dataclass(frozen=True)
class Instance:
    """One instance as a cell holds it. Times are seconds since the epoch (UTC)."""

    uuid: str
    name: str
    project: str
    user: str
    flavor: str
    memory_mb: int
    disk_gb: int
    vcpus: int
    image: str
    vm_state: VmState
    task_state: TaskState | None
    power_state: PowerState
    cell: str | None
    host: str | None
    version: int
    created_at: float
    updated_at: float
    deleted_at: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    fault: Fault | None = None

    @property
    def deleted(self) -> bool:
        return self.vm_state is VmState.DELETED

    @property
    def status(self) -> str:
        """The status a user sees, as nova derives it."""
        if self.vm_state is VmState.ACTIVE and self.task_state is TaskState.REBOOTING:
            return "REBOOT"
        return _STATUS[self.vm_state]

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready form that crosses the wire and fills the outbox.

        Its keys are `FIELDS`, in order; enums go as their values.
        """
        wire = {name: getattr(self, name) for name in FIELDS}
        for name, encode in _TO_WIRE.items():
            wire[name] = encode(wire[name])
        return wire

    @classmethod
    def from_wire(cls, raw: Any) -> Instance:
        """An instance from its wire form; `SchemaError` naming the first bad field."""
        return cls(*fields_from_wire(raw))

    def view(self) -> dict[str, Any]:
        """What a user is shown for a server (`server show --json`)."""
        shown: dict[str, Any] = {
            "uuid": self.uuid,
            "name": self.name,
            "status": self.status,
            "vm_state": self.vm_state.value,
            "task_state": None if self.task_state is None else self.task_state.value,
            "power_state": self.power_state.value,
            "cell": self.cell,
            "host": self.host,
            "flavor": self.flavor,
            "image": self.image,
            "project": self.project,
            "user": self.user,
            "metadata": dict(self.metadata),
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if self.fault is not None:
            shown["fault"] = self.fault.to_wire()
        return shown


class InstanceFields(NamedTuple):
    """An instance's fields in `Instance`'s order, as `fields_from_wire` checked them.

    `Instance(*fields)` is the instance. The API cell writes these to its index
    as they are: it takes one record for every change in the tree, and a tuple
    costs a fraction of what a frozen dataclass of twenty fields does to build.
    """

    uuid: str
    name: str
    project: str
    user: str
    flavor: str
    memory_mb: int
    disk_gb: int
    vcpus: int
    image: str
    vm_state: VmState
    task_state: TaskState | None
    power_state: PowerState
    cell: str | None
    host: str | None
    version: int
    created_at: float
    updated_at: float
    deleted_at: float | None
    metadata: Mapping[str, str]
    fault: Fault | None

    @property
    def deleted(self) -> bool:
        return self.vm_state is VmState.DELETED


def fields_from_wire(raw: Any) -> InstanceFields:
    """The fields of an instance's wire form, each checked; `SchemaError` naming the first bad one.

    What `Instance.from_wire` builds its instance from: every record taken from
    the wire goes through here.
    """
    if type(raw) is not dict:
        raise SchemaError("instance: expected a map")
    if raw.keys() != _WIRE_FIELDS:
        extra = sorted(str(k)[:40] for k in raw.keys() - _WIRE_FIELDS)
        missing = sorted(_WIRE_FIELDS - raw.keys())
        raise SchemaError(f"instance: unexpected fields {extra}, missing {missing}")
    task_state, cell, host = raw["task_state"], raw["cell"], raw["host"]
    deleted_at, fault = raw["deleted_at"], raw["fault"]
    return InstanceFields(
        _uuid(raw["uuid"]),
        _text(raw["name"], "name"),
        _name(raw["project"], "project"),
        _name(raw["user"], "user"),
        _name(raw["flavor"], "flavor"),
        _count(raw["memory_mb"], "memory_mb"),
        _count(raw["disk_gb"], "disk_gb"),
        _count(raw["vcpus"], "vcpus"),
        _text(raw["image"], "image"),
        _enum(_VM_STATES, raw["vm_state"], "vm_state"),
        None if task_state is None else _enum(_TASK_STATES, task_state, "task_state"),
        _enum(_POWER_STATES, raw["power_state"], "power_state"),
        None if cell is None else _cell(cell, "cell"),
        None if host is None else _text(host, "host"),
        _count(raw["version"], "version"),
        _time(raw["created_at"], "created_at"),
        _time(raw["updated_at"], "updated_at"),
        None if deleted_at is None else _time(deleted_at, "deleted_at"),
        check_metadata(raw["metadata"]),
        None if fault is None else _fault(fault),
    )


_STATUS: Final = {
    VmState.BUILDING: "BUILD",
    VmState.ACTIVE: "ACTIVE",
    VmState.STOPPED: "SHUTOFF",
    VmState.ERROR: "ERROR",
    VmState.DELETED: "DELETED",
}
# The one list of an instance's fields: `InstanceFields` (whose order `Instance` keeps, as a
# test checks). The wire form has the same keys in the same order.
FIELDS: Final = InstanceFields._fields
_WIRE_FIELDS: Final = frozenset(FIELDS)
_TO_WIRE: Final[Mapping[str, Callable[[Any], Any]]] = {
    "vm_state": lambda state: state.value,
    "task_state": lambda state: None if state is None else state.value,
    "power_state": lambda state: state.value,
    "metadata": dict,
    "fault": lambda fault: None if fault is None else fault.to_wire(),
}


# -- life cycle ---------------------------------------------------------------------------


def new_instance(
    *,
    uuid: str,
    name: str,
    project: str,
    user: str,
    flavor: str,
    memory_mb: int,
    disk_gb: int,
    vcpus: int,
    image: str,
    metadata: Mapping[str, str],
    now: float,
) -> Instance:
    """A server as the API cell first records it: building, waiting for a cell."""
    return Instance(
        uuid=_uuid(uuid),
        name=_text(name, "name"),
        project=_name(project, "project"),
        user=_name(user, "user"),
        flavor=_name(flavor, "flavor"),
        memory_mb=_count(memory_mb, "memory_mb"),
        disk_gb=_count(disk_gb, "disk_gb"),
        vcpus=_count(vcpus, "vcpus"),
        image=_text(image, "image"),
        vm_state=VmState.BUILDING,
        task_state=TaskState.SCHEDULING,
        power_state=PowerState.NOSTATE,
        cell=None,
        host=None,
        version=0,
        created_at=now,
        updated_at=now,
        metadata=check_metadata(dict(metadata)),
    )


def _changed(instance: Instance, now: float, **changes: Any) -> Instance:
    return replace(instance, version=instance.version + 1, updated_at=now, **changes)


def relocated(instance: Instance, cell: str, now: float) -> Instance:
    """The same instance in the same cell, whose path changed: the cell moved to a new parent."""
    return _changed(instance, now, cell=cell)


def placed(instance: Instance, cell: str, host: str, now: float) -> Instance:
    """The owning cell took a scheduling instance onto `host`: now it spawns there."""
    if instance.vm_state is not VmState.BUILDING or instance.task_state is not (
        TaskState.SCHEDULING
    ):
        raise Conflict(f"instance {instance.uuid} is not waiting to be placed")
    return _changed(instance, now, cell=cell, host=host, task_state=TaskState.SPAWNING)


def begin(instance: Instance, action: Action, now: float) -> Instance:
    """Start `action`: its task is set, or `Conflict` if the instance's state forbids it."""
    allowed, task = _STARTS[action]
    if instance.vm_state not in allowed:
        raise Conflict(
            f"cannot {action.value} instance {instance.uuid} while it is {instance.vm_state.value}"
        )
    if instance.task_state is not None and action is not Action.DELETE:
        raise Conflict(
            f"cannot {action.value} instance {instance.uuid} while it is "
            f"{instance.task_state.value}"
        )
    if instance.task_state is TaskState.DELETING:
        raise Conflict(f"instance {instance.uuid} is being deleted already")
    return _changed(instance, now, task_state=task)


def finish(instance: Instance, now: float) -> Instance:
    """Complete the task in progress: spawning, powering off or on, rebooting, deleting."""
    if instance.task_state is None or instance.task_state not in _FINISHES:
        raise Conflict(f"instance {instance.uuid} has no task to finish")
    vm_state, power_state = _FINISHES[instance.task_state]
    deleted_at = now if vm_state is VmState.DELETED else instance.deleted_at
    return _changed(
        instance,
        now,
        vm_state=vm_state,
        power_state=power_state,
        task_state=None,
        deleted_at=deleted_at,
    )


def failed(instance: Instance, fault: Fault, now: float) -> Instance:
    """The instance went to error; `fault` says why."""
    return _changed(
        instance,
        now,
        vm_state=VmState.ERROR,
        task_state=None,
        power_state=PowerState.NOSTATE,
        fault=fault,
    )


def newer(update: Instance, held: Instance | None) -> bool:
    """Whether a parent holding `held` should take `update` in its place."""
    return held is None or update.version > held.version


# -- field checks ---------------------------------------------------------------------------


def check_metadata(value: Any) -> dict[str, str]:
    """User metadata: at most 64 string pairs, keys and values of 1-255 characters."""
    if type(value) is not dict or len(value) > MAX_METADATA_ITEMS:
        raise SchemaError(f"instance: metadata must be a map of at most {MAX_METADATA_ITEMS}")
    for key, item in value.items():
        _text(key, "metadata key")
        if type(item) is not str or len(item) > MAX_TEXT_LENGTH:
            raise SchemaError(f"instance: metadata value of {str(key)[:40]!r} is not a string")
    return dict(value)


# `from_wire` runs these on every record a child sends up, so each is a type check plus
# a regular expression or a table lookup; names and cell paths repeat across records
# (projects, flavors, hosts, cells), so each distinct one is checked in full once.
_UUID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CHECKED_NAMES: Final = 4096  # distinct names and cell paths remembered as checked


def _uuid(value: Any) -> str:
    """A uuid in its canonical form: lower-case hex in groups of 8-4-4-4-12."""
    if type(value) is str and _UUID_RE.fullmatch(value):
        return value
    raise SchemaError("instance: field 'uuid': expected a lower-case uuid")


def _text(value: Any, what: str) -> str:
    if (
        type(value) is not str
        or not 0 < len(value) <= MAX_TEXT_LENGTH
        or not value.isprintable()
        or value != value.strip()
    ):
        raise SchemaError(
            f"instance: field {what!r}: expected 1-{MAX_TEXT_LENGTH} printable characters"
        )
    return value


@functools.lru_cache(maxsize=_CHECKED_NAMES)
def _is_name(value: str) -> bool:
    try:
        check_name("name", value)
    except ValidationError:
        return False
    return True


@functools.lru_cache(maxsize=_CHECKED_NAMES)
def _is_cell_path(value: str) -> bool:
    try:
        check_cell_path(value)
    except ValidationError:
        return False
    return True


def _name(value: Any, what: str) -> str:
    if type(value) is str and _is_name(value):
        return value
    raise SchemaError(f"instance: field {what!r}: expected a name")


def _cell(value: Any, what: str) -> str:
    if type(value) is str and _is_cell_path(value):
        return value
    raise SchemaError(f"instance: field {what!r}: expected a cell path")


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 62:
        raise SchemaError(f"instance: field {what!r}: expected a non-negative integer")
    return value


def _time(value: Any, what: str) -> float:
    if type(value) is int:
        value = float(value)
    if type(value) is not float or not math.isfinite(value) or value < 0:
        raise SchemaError(f"instance: field {what!r}: expected seconds since the epoch")
    if value >= _LAST_SECOND:  # a column holds no later time: refused here, not at the write
        raise SchemaError(f"instance: field {what!r}: time {value!r} is out of range")
    return value


_LAST_SECOND: Final = 253_402_300_800.0  # 10000-01-01T00:00:00Z


_VM_STATES: Final[Mapping[str, VmState]] = {state.value: state for state in VmState}
_TASK_STATES: Final[Mapping[str, TaskState]] = {state.value: state for state in TaskState}
_POWER_STATES: Final[Mapping[str, PowerState]] = {state.value: state for state in PowerState}


def _enum(members: Mapping[str, Any], value: Any, what: str) -> Any:
    """The state named `value` exactly; `members` maps each value to its enum member."""
    member = members.get(value) if type(value) is str else None
    if member is None:
        raise SchemaError(f"instance: field {what!r}: expected one of {', '.join(members)}")
    return member


def _fault(raw: Any) -> Fault:
    if type(raw) is not dict or raw.keys() != {"code", "message", "cell"}:
        raise SchemaError("instance: fault must be a map of code, message and cell")
    code, message, cell = raw["code"], raw["message"], raw["cell"]
    if type(code) is not str or not code.startswith("E_") or len(code) > 64:
        raise SchemaError("instance: fault code must be an error code like E_NO_VALID_HOST")
    if type(message) is not str or len(message) > 4096:
        raise SchemaError("instance: fault message must be a string")
    return Fault(code, message, None if cell is None else _cell(cell, "fault.cell"))
