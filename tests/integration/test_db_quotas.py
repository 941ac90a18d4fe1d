"""Quotas in the API cell's database: limits per project, checked in the create's transaction."""

from __future__ import annotations

import pytest
from zcells.db import instances as store
from zcells.db import quotas as quotas_store
from zcells.db.engine import Database

from tests.integration.test_db_instances import server
from zcells.errors import QuotaExceeded
from zcells.instances import Action, begin, finish
from zcells.quotas import Quota, Usage

NOVA = Quota(servers=10, vcpus=20, ram_mb=51200)


def test_a_create_past_a_limit_writes_nothing(synced: Database) -> None:
    store.index_create(synced, [server(n) for n in range(1, 9)], "first", quota=NOVA)
    with pytest.raises(QuotaExceeded, match="servers limit 10, in use 8, requested 3"):
        store.index_create(synced, [server(n) for n in range(9, 12)], "second", quota=NOVA)
    assert store.get(synced, server(9).uuid) is None
    store.index_create(synced, [server(9), server(10)], "third", quota=NOVA)  # exactly at it
    # Another project holds nothing yet; an admin's create passes no quota.
    store.index_create(synced, [server(20, project="p2")], "fourth", quota=NOVA)
    store.index_create(synced, [server(n) for n in range(30, 40)], "admin", quota=None)


def test_vcpus_and_ram_count_too(synced: Database) -> None:
    big = [server(n, vcpus=8, memory_mb=16384) for n in range(1, 4)]
    with pytest.raises(QuotaExceeded, match="vcpus limit 20"):
        store.index_create(synced, big, "big", quota=NOVA)
    with pytest.raises(QuotaExceeded, match="ram_mb limit 51200"):
        store.index_create(synced, [server(5, memory_mb=60000)], "ram", quota=NOVA)


def test_a_repeat_answers_as_before_without_a_new_check(synced: Database) -> None:
    first = store.index_create(synced, [server(n) for n in range(1, 11)], "full", quota=NOVA)
    again = store.index_create(synced, [server(n) for n in range(1, 11)], "full", quota=NOVA)
    assert [i.uuid for i in again] == [i.uuid for i in first]


def test_deleted_servers_free_their_share(synced: Database) -> None:
    made = store.index_create(synced, [server(n) for n in range(1, 11)], "full", quota=NOVA)
    gone = finish(begin(made[0], Action.DELETE, 2.0), 2.0)
    assert store.index_put(synced, gone)
    store.index_create(synced, [server(11)], "one more", quota=NOVA)


def test_an_admins_limits_for_a_project_replace_the_defaults(synced: Database) -> None:
    assert quotas_store.set_limits(synced, "p1", {"servers": 2, "vcpus": -1}) == {
        "servers": 2,
        "vcpus": -1,
    }
    limits, own, held = quotas_store.show(synced, "p1", NOVA)
    assert limits == Quota(servers=2, vcpus=-1, ram_mb=51200)
    assert own == {"servers": 2, "vcpus": -1} and held == Usage()
    with pytest.raises(QuotaExceeded, match="servers limit 2"):
        store.index_create(synced, [server(n) for n in range(1, 4)], "three", quota=NOVA)
    store.index_create(synced, [server(1, vcpus=100), server(2)], "two", quota=NOVA)
    assert quotas_store.show(synced, "p1", NOVA)[2] == Usage(2, 101, 4096)
    quotas_store.set_limits(synced, "p1", {"servers": None})  # back to the default
    assert quotas_store.show(synced, "p1", NOVA)[0].servers == 10
    with pytest.raises(ValueError, match="no quota 'cores'"):
        quotas_store.set_limits(synced, "p1", {"cores": 3})
    with pytest.raises(ValueError, match="-1"):
        quotas_store.set_limits(synced, "p1", {"servers": -2})
