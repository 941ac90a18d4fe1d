"""Flavors, images and the global log on a real database (SQLite, and PostgreSQL when marked).

The API cell's changes are logged one row per (kind, name); a cell below
applies its parent's rows once each, in order, and ends with the same log.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from zcells.db import catalog, migrate, registry
from zcells.db.engine import Database

from zcells.errors import AlreadyExists, NotFound, ValidationError
from zcells.globaldata import FLAVOR, IMAGE, Change
from zcells.records import DEFAULT_FLAVORS, DEFAULT_IMAGES, Flavor, Image
from zcells.sockets.keys import generate_keypair

TINY = Flavor("tiny", 256, 1, 1)
KVM = Image("kvm-image", {"hypervisor_type": "kvm", "architecture": "x86_64"})


def flavor(seq: int, name: str, ram: int = 512) -> Change:
    return Change(seq, FLAVOR, name, Flavor(name, ram, 1, 1))


def image(seq: int, name: str, **properties: str) -> Change:
    return Change(seq, IMAGE, name, Image(name, dict(properties)))


def gone(seq: int, kind: str, name: str) -> Change:
    return Change(seq, kind, name, None)


def log_of(db: Database) -> list[tuple[int, str, str, bool]]:
    return [(c.seq, c.kind, c.name, c.deleted) for c in catalog.read_log(db, 0, 1000)]


# -- at the API cell ------------------------------------------------------------------------


def test_each_change_writes_its_row_and_one_log_row(synced: Database) -> None:
    catalog.create_flavor(synced, TINY)
    made = catalog.create_image(synced, KVM)
    assert made == Image("kvm-image", {"architecture": "x86_64", "hypervisor_type": "kvm"})
    changed = catalog.set_image_properties(
        synced, "kvm-image", {"hypervisor_version_requires": ">=6.0"}, unset=["architecture"]
    )
    assert changed.properties == {"hypervisor_type": "kvm", "hypervisor_version_requires": ">=6.0"}
    assert catalog.get_image(synced, "kvm-image") == changed
    assert catalog.delete_flavor(synced, "tiny") == TINY

    assert catalog.list_flavors(synced) == []
    assert catalog.list_images(synced) == [changed]
    # one row per name: the image's newest change, the flavor's tombstone
    assert log_of(synced) == [(3, IMAGE, "kvm-image", False), (4, FLAVOR, "tiny", True)]
    assert catalog.read_log(synced, 0, 10)[0].record == changed
    assert catalog.last_seq(synced) == 4


def test_a_refused_change_logs_nothing(synced: Database) -> None:
    catalog.create_image(synced, KVM)
    with pytest.raises(AlreadyExists):
        catalog.create_image(synced, Image("kvm-image"))
    with pytest.raises(NotFound):
        catalog.delete_flavor(synced, "nope")
    with pytest.raises(NotFound):
        catalog.set_image_properties(synced, "nope", {"a": "b"})
    with pytest.raises(ValidationError, match="property key"):
        catalog.create_image(synced, Image("bad", {"no spaces": "x"}))
    with pytest.raises(ValidationError, match="hypervisor_version_requires"):
        catalog.create_image(synced, Image("bad", {"hypervisor_version_requires": "newest"}))
    with pytest.raises(ValidationError, match="properties"):
        catalog.create_image(synced, Image("bad", {f"k{i}": "v" for i in range(33)}))
    with pytest.raises(ValidationError, match="image name"):
        catalog.create_image(synced, Image("with space"))
    assert log_of(synced) == [(1, IMAGE, "kvm-image", False)]
    assert catalog.last_seq(synced) == 1


def test_an_unchanged_image_is_not_logged_again(synced: Database) -> None:
    catalog.create_image(synced, KVM)
    catalog.set_image_properties(synced, "kvm-image", {"hypervisor_type": "kvm"})
    assert catalog.last_seq(synced) == 1


def test_defaults_are_seeded_once_and_logged(synced: Database) -> None:
    assert catalog.seed_default_flavors(synced) == len(DEFAULT_FLAVORS)
    assert catalog.seed_default_images(synced) == len(DEFAULT_IMAGES)
    assert catalog.seed_default_flavors(synced) == 0
    assert catalog.seed_default_images(synced) == 0
    assert [i.name for i in catalog.list_images(synced)] == ["cirros"]
    assert registry.list_flavors(synced) == list(DEFAULT_FLAVORS)  # the registry's name still works
    names = [name for _, _, name, _ in log_of(synced)]
    assert names == [f.name for f in DEFAULT_FLAVORS] + ["cirros"]


def test_renumber_puts_every_row_past_a_child_that_is_ahead(synced: Database) -> None:
    catalog.create_flavor(synced, TINY)
    catalog.create_image(synced, KVM)
    catalog.delete_flavor(synced, "tiny")
    assert catalog.renumber(synced, 40) == 2
    assert log_of(synced) == [(41, IMAGE, "kvm-image", False), (42, FLAVOR, "tiny", True)]
    assert catalog.last_seq(synced) == 42
    catalog.create_flavor(synced, TINY)  # the next change follows on
    assert log_of(synced)[-1] == (43, FLAVOR, "tiny", False)


# -- below it: applying a parent's rows -----------------------------------------------------


def test_rows_apply_in_order_and_a_repeat_changes_nothing(synced: Database) -> None:
    batch = [flavor(1, "a"), image(2, "b", architecture="arm"), flavor(3, "a", ram=1024)]
    assert catalog.apply(synced, batch) == 3
    assert catalog.list_flavors(synced) == [Flavor("a", 1024, 1, 1)]
    assert catalog.list_images(synced) == [Image("b", {"architecture": "arm"})]
    assert log_of(synced) == [(2, IMAGE, "b", False), (3, FLAVOR, "a", False)]

    # the same batch again, and one that overlaps it: only the new row counts
    assert catalog.apply(synced, batch) == 3
    assert catalog.apply(synced, [flavor(2, "late"), gone(4, IMAGE, "b")]) == 4
    assert [f.name for f in catalog.list_flavors(synced)] == ["a"]  # seq 2 was seen
    assert catalog.list_images(synced) == []
    assert log_of(synced) == [(3, FLAVOR, "a", False), (4, IMAGE, "b", True)]


def test_a_delete_of_something_never_seen_leaves_its_tombstone(synced: Database) -> None:
    assert catalog.apply(synced, [gone(7, FLAVOR, "never")]) == 7
    assert catalog.list_flavors(synced) == []
    assert log_of(synced) == [(7, FLAVOR, "never", True)]
    assert catalog.apply(synced, [flavor(8, "never")]) == 8  # and a later create brings it back
    assert [f.name for f in catalog.list_flavors(synced)] == ["never"]


def test_a_child_ends_with_its_parents_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    """So it streams on to its own children the very rows it was sent."""
    root = tmp_path_factory.mktemp("mirror")
    with (
        Database(f"sqlite:///{root / 'top.db'}") as top,
        Database(f"sqlite:///{root / 'child.db'}") as child,
    ):
        migrate.sync(top)
        migrate.sync(child)
        catalog.seed_default_flavors(top)
        catalog.seed_default_images(top)
        catalog.create_image(top, KVM)
        catalog.delete_flavor(top, "m1.small")
        catalog.set_image_properties(top, "cirros", {"architecture": "x86_64"})
        applied = 0
        for _ in range(100):  # batches of two, as a stream would send them
            rows = catalog.read_log(top, applied, 2)
            if not rows:
                break
            applied = catalog.apply(child, rows)
        assert catalog.read_log(child, 0, 100) == catalog.read_log(top, 0, 100)
        assert catalog.last_seq(child) == catalog.last_seq(top) == applied
        assert catalog.list_flavors(child) == catalog.list_flavors(top)
        assert catalog.list_images(child) == catalog.list_images(top)


# -- the migration --------------------------------------------------------------------------


def _at_0005_with_flavors(db: Database) -> None:
    migrate.upgrade(db, "0005")
    with db.write() as session:
        for name, ram in (("small", 512), ("big", 4096)):
            session.execute(
                sa.text(
                    "INSERT INTO flavors (name, memory_mb, disk_gb, vcpus, created_at) "
                    "VALUES (:name, :ram, 1, 1, '2026-01-01 00:00:00')"
                ),
                {"name": name, "ram": ram},
            )


def test_upgrade_logs_the_flavors_an_api_cell_has(database: Database) -> None:
    _at_0005_with_flavors(database)
    migrate.sync(database)
    assert log_of(database) == [(1, FLAVOR, "small", False), (2, FLAVOR, "big", False)]
    assert catalog.read_log(database, 0, 1)[0].record == Flavor("small", 512, 1, 1)
    assert catalog.last_seq(database) == 2
    catalog.create_image(database, KVM)  # new changes follow on
    assert log_of(database)[-1] == (3, IMAGE, "kvm-image", False)


def test_upgrade_logs_nothing_at_a_cell_with_a_parent(
    database: Database, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _at_0005_with_flavors(database)
    key = generate_keypair(tmp_path_factory.mktemp("keys"), "api").public
    registry.add_cell(
        database, "api", kind="parent", endpoint="tcp://127.0.0.1:7750", public_key=key
    )
    migrate.sync(database)
    assert log_of(database) == []
    assert catalog.last_seq(database) == 0  # the parent's rows from 1 on are all new here
