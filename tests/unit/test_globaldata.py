"""Checks of flavors, images and `global_updates` batches, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from zcells.errors import SchemaError, ValidationError
from zcells.globaldata import (
    MAX_PROPERTIES,
    MAX_ROWS,
    MAX_SEQ,
    Change,
    check_image,
    check_properties,
    check_rows,
)
from zcells.records import Flavor, Image

FLAVOR_MAP = {"name": "m1.tiny", "memory_mb": 512, "disk_gb": 1, "vcpus": 1}
IMAGE_MAP = {"name": "cirros", "properties": {"architecture": "x86_64"}}


def test_a_good_batch_comes_back_as_changes() -> None:
    rows = [
        [1, "flavor", "m1.tiny", FLAVOR_MAP],
        [5, "image", "cirros", IMAGE_MAP],
        [9, "image", "gone", None],
    ]
    assert check_rows(rows) == [
        Change(1, "flavor", "m1.tiny", Flavor("m1.tiny", 512, 1, 1)),
        Change(5, "image", "cirros", Image("cirros", {"architecture": "x86_64"})),
        Change(9, "image", "gone", None),
    ]
    assert [change.to_wire() for change in check_rows(rows)] == rows


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ("rows", "list of 1"),
        ([], "list of 1"),
        ([[n, "image", f"i{n}", None] for n in range(1, MAX_ROWS + 2)], "list of 1"),
        ([[1, "image", "a"]], "row 0 is not"),
        ([(1, "image", "a", None)], "row 0 is not"),
        ([[0, "image", "a", None]], "seqs must rise"),
        ([[True, "image", "a", None]], "seqs must rise"),
        ([[MAX_SEQ + 1, "image", "a", None]], "seqs must rise"),
        ([[2, "image", "a", None], [2, "image", "b", None]], "row 1: seqs must rise"),
        ([[3, "image", "a", None], [2, "image", "b", None]], "row 1: seqs must rise"),
        ([[1, "host", "a", None]], "kind must be"),
        ([[1, b"image", "a", None]], "kind must be"),
        ([[1, "image", "a!b", None]], "image name"),
        ([[1, "image", "x" * 65, None]], "image name"),
        ([[1, "image", 7, None]], "image name"),
        ([[1, "image", "cirros", FLAVOR_MAP]], "an image is"),
        ([[1, "flavor", "m1.tiny", IMAGE_MAP]], "a flavor is"),
        ([[1, "flavor", "other", FLAVOR_MAP]], "the record names 'm1.tiny'"),
        ([[1, "flavor", "m1.tiny", {**FLAVOR_MAP, "memory_mb": 0}]], "RAM"),
        ([[1, "flavor", "m1.tiny", {**FLAVOR_MAP, "vcpus": True}]], "vCPUs"),
        ([[1, "flavor", "m1.tiny", {**FLAVOR_MAP, "disk_gb": 1 << 40}]], "disk"),
        ([[1, "flavor", "m1.tiny", {**FLAVOR_MAP, "extra": 1}]], "a flavor is"),
        ([[1, "image", "cirros", {"name": "cirros", "properties": []}]], "must be a map"),
        ([[1, "image", "cirros", {"name": "cirros", "properties": {"k": 1}}]], "property k"),
        ([[1, "image", "cirros", {"name": "cirros", "properties": {"k": "\n"}}]], "property k"),
        ([[1, "image", "cirros", {"name": "cirros", "properties": {"k": "v" * 256}}]], "k"),
        (
            [[1, "image", "cirros", {"name": "cirros", "properties": {"a b": "v"}}]],
            "property key",
        ),
        (
            [[1, "image", "cirros", {"name": "c", "properties": {"architecture": "x 86"}}]],
            "property architecture",
        ),
    ],
)
def test_a_bad_row_refuses_the_whole_batch(rows: Any, needle: str) -> None:
    good = [[100 + n, "image", f"ok{n}", None] for n in range(3)]
    batch = rows if not isinstance(rows, list) or not rows else [*rows, *good]
    if isinstance(batch, list) and len(batch) > MAX_ROWS:
        batch = rows
    with pytest.raises(SchemaError, match=needle):
        check_rows(batch)


def test_properties_are_bounded_and_the_schedulers_own_well_formed() -> None:
    assert check_properties({"os_distro": "ubuntu", "architecture": "aarch64"}) == {
        "architecture": "aarch64",
        "os_distro": "ubuntu",
    }
    assert check_properties({"hypervisor_version_requires": ">= 6.0"})
    assert check_properties({"hypervisor_version_requires": "4.2.1"})
    assert check_properties({"note": ""}) == {"note": ""}  # any other key: free text
    with pytest.raises(ValidationError, match="at most"):
        check_properties({f"k{n}": "v" for n in range(MAX_PROPERTIES + 1)})
    with pytest.raises(ValidationError, match="hypervisor_type"):
        check_properties({"hypervisor_type": "kvm;xen"})
    with pytest.raises(ValidationError, match="hypervisor_version_requires"):
        check_properties({"hypervisor_version_requires": "~> 6"})
    with pytest.raises(ValidationError, match="property key"):
        check_properties({"k" * 65: "v"})
    assert check_image(Image("a", {"b": "1", "a": "2"})).properties == {"a": "2", "b": "1"}
