"""Instance records from the wire: every field checked, in `Instance`'s order."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from zcells.errors import SchemaError
from zcells.instances import (
    Fault,
    Instance,
    InstanceFields,
    failed,
    fields_from_wire,
    new_instance,
    placed,
)

T0 = 1_764_000_000.25


def record() -> Instance:
    base = new_instance(
        uuid="0001ce6a-0421-425e-9d1a-7eac49f97759",
        name="web-1",
        project="p1",
        user="u1",
        flavor="m1.small",
        memory_mb=2048,
        disk_gb=20,
        vcpus=1,
        image="cirros",
        metadata={"role": "web"},
        now=T0,
    )
    return failed(placed(base, "api!eu", "h1", T0 + 1), Fault("E_INTERNAL", "boom", "api!eu"), T0)


def test_the_fields_are_the_instance_in_its_order() -> None:
    assert InstanceFields._fields == tuple(f.name for f in dataclasses.fields(Instance))
    instance = record()
    fields = fields_from_wire(instance.to_wire())
    assert Instance(*fields) == Instance.from_wire(instance.to_wire()) == instance
    assert fields.deleted is instance.deleted is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"uuid": "0001CE6A-0421-425E-9D1A-7EAC49F97759"}, "uuid"),
        ({"name": " web"}, "name"),
        ({"project": "p 1"}, "project"),
        ({"user": 7}, "user"),
        ({"flavor": ""}, "flavor"),
        ({"memory_mb": -1}, "memory_mb"),
        ({"disk_gb": 1.0}, "disk_gb"),
        ({"vcpus": True}, "vcpus"),
        ({"image": "a\nb"}, "image"),
        ({"vm_state": "ACTIVE"}, "vm_state"),
        ({"task_state": "sleeping"}, "task_state"),
        ({"power_state": None}, "power_state"),
        ({"cell": "api!!eu"}, "cell"),
        ({"host": ""}, "host"),
        ({"version": 1 << 62}, "version"),
        ({"created_at": float("nan")}, "created_at"),
        ({"updated_at": -1.0}, "updated_at"),
        ({"deleted_at": "now"}, "deleted_at"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"fault": {"code": "BOOM", "message": "", "cell": None}}, "fault code"),
        ({"fault": {"code": "E_X", "message": "", "cell": "a b"}}, "fault.cell"),
        ({"extra": 1}, "unexpected fields \\['extra'\\]"),
    ],
)
def test_a_bad_field_is_a_schema_error_naming_it(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        fields_from_wire(record().to_wire() | change)
    with pytest.raises(SchemaError, match=message):
        Instance.from_wire(record().to_wire() | change)


def test_a_missing_field_or_not_a_map_is_a_schema_error() -> None:
    wire = record().to_wire()
    del wire["host"]
    with pytest.raises(SchemaError, match="missing \\['host'\\]"):
        fields_from_wire(wire)
    with pytest.raises(SchemaError, match="expected a map"):
        fields_from_wire([])
