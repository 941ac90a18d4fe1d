"""The host scheduler as tables of hosts: filters, weigher order and refusal messages."""

from __future__ import annotations

import pytest

from zcells.errors import NoValidHost
from zcells.hostsched import choose_hosts, need_of, no_valid_host
from zcells.records import DEFAULT_FLAVORS, Flavor, Host, Resources

SMALL = Resources(memory_mb=2048, disk_gb=20, vcpus=1)


def host(
    name: str,
    *,
    enabled: bool = True,
    free_ram: int = 8192,
    free_disk: int = 100,
    free_vcpus: int = 4,
) -> Host:
    """A host with the given free amounts, half of a double-sized host already used."""
    return Host(
        name,
        enabled,
        memory_mb=2 * free_ram,
        disk_gb=2 * free_disk,
        vcpus=2 * free_vcpus,
        memory_mb_used=free_ram,
        disk_gb_used=free_disk,
        vcpus_used=free_vcpus,
    )


def test_need_of_a_flavor_is_its_ram_disk_and_vcpus() -> None:
    assert need_of(Flavor("m1.small", 2048, 20, 1)) == SMALL
    for flavor in DEFAULT_FLAVORS:
        need = need_of(flavor)
        assert (need.memory_mb, need.disk_gb, need.vcpus) == (
            flavor.memory_mb,
            flavor.disk_gb,
            flavor.vcpus,
        )


@pytest.mark.parametrize(
    "refused",
    [
        host("h-refused", enabled=False),
        host("h-refused", free_ram=2047),
        host("h-refused", free_disk=19),
        host("h-refused", free_vcpus=0),
    ],
    ids=["disabled", "ram", "disk", "vcpus"],
)
def test_each_filter_excludes_its_host_and_only_that_one(refused: Host) -> None:
    assert choose_hosts([host("h-ok"), refused], SMALL) == ["h-ok"]


def test_a_host_with_exactly_the_need_free_passes() -> None:
    exact = host("h-exact", free_ram=2048, free_disk=20, free_vcpus=1)
    assert choose_hosts([exact], SMALL) == ["h-exact"]


def test_an_overcommitted_host_is_refused() -> None:
    over = Host("h-over", True, 4096, 40, 2, memory_mb_used=6000)
    assert choose_hosts([over], SMALL) == []


def test_choice_agrees_with_fits_in() -> None:
    hosts = [
        host(f"h{ram}-{disk}-{cpus}", free_ram=ram, free_disk=disk, free_vcpus=cpus)
        for ram in (0, 2048, 4096)
        for disk in (0, 20, 40)
        for cpus in (0, 1, 2)
    ]
    chosen = set(choose_hosts(hosts, SMALL))
    assert chosen == {h.name for h in hosts if SMALL.fits_in(h.free)}


def test_weigher_most_free_ram_then_most_free_vcpus_then_name() -> None:
    hosts = [
        host("d", free_ram=4096, free_vcpus=2),
        host("c", free_ram=4096, free_vcpus=8),
        host("b", free_ram=4096, free_vcpus=2),
        host("a", free_ram=2048, free_vcpus=16),
        host("e", free_ram=16384, free_vcpus=1),
    ]
    assert choose_hosts(hosts, SMALL) == ["e", "c", "b", "d", "a"]


def test_order_does_not_depend_on_the_order_hosts_came_in() -> None:
    hosts = [host(name, free_ram=4096) for name in ("h3", "h1", "h2")]
    assert choose_hosts(hosts, SMALL) == ["h1", "h2", "h3"]
    assert choose_hosts(list(reversed(hosts)), SMALL) == ["h1", "h2", "h3"]


def test_free_disk_does_not_weigh() -> None:
    hosts = [host("a", free_disk=20), host("b", free_disk=1000)]
    assert choose_hosts(hosts, SMALL) == ["a", "b"]


def test_an_empty_cell_and_a_disabled_only_cell_choose_nothing() -> None:
    assert choose_hosts([], SMALL) == []
    assert choose_hosts([host("h1", enabled=False), host("h2", enabled=False)], SMALL) == []


def test_no_valid_host_in_an_empty_cell() -> None:
    error = no_valid_host([], SMALL, "api!c1")
    assert isinstance(error, NoValidHost)
    assert error.code == "E_NO_VALID_HOST"
    assert error.cell == "api!c1"
    assert error.message == (
        "no valid host in api!c1 for 2048 MB RAM, 20 GB disk, 1 vCPU: the cell has no hosts"
    )


def test_no_valid_host_in_a_disabled_only_cell() -> None:
    hosts = [host("h1", enabled=False), host("h2", enabled=False, free_ram=0)]
    assert no_valid_host(hosts, SMALL, "api!c1").message == (
        "no valid host in api!c1 for 2048 MB RAM, 20 GB disk, 1 vCPU: 2 hosts, 2 disabled"
    )


def test_no_valid_host_counts_each_host_under_its_first_failing_filter() -> None:
    hosts = [
        host("h1", enabled=False, free_ram=0, free_disk=0, free_vcpus=0),
        host("h2", free_ram=0, free_disk=0, free_vcpus=0),
        host("h3", free_ram=1024),
        host("h4", free_disk=0, free_vcpus=0),
        host("h5", free_disk=10),
        host("h6", free_vcpus=0),
    ]
    need = Resources(4096, 40, 2)
    assert no_valid_host(hosts, need, "api!eu!c1").message == (
        "no valid host in api!eu!c1 for 4096 MB RAM, 40 GB disk, 2 vCPUs: "
        "6 hosts, 1 disabled, 2 short of RAM, 2 short of disk, 1 short of vCPUs"
    )


def test_no_valid_host_example_from_the_design() -> None:
    hosts = [host("h1", enabled=False)] + [host(f"h{i}", free_ram=1024) for i in (2, 3, 4)]
    assert no_valid_host(hosts, SMALL, "api!c1").message == (
        "no valid host in api!c1 for 2048 MB RAM, 20 GB disk, 1 vCPU: "
        "4 hosts, 1 disabled, 3 short of RAM"
    )


def test_no_valid_host_counts_hosts_that_fit_as_lost_to_concurrent_claims() -> None:
    hosts = [host("h1"), host("h2", enabled=False)]
    assert no_valid_host(hosts, SMALL, "c1").message == (
        "no valid host in c1 for 2048 MB RAM, 20 GB disk, 1 vCPU: "
        "2 hosts, 1 disabled, 1 lost to concurrent claims"
    )


def test_no_valid_host_with_one_host() -> None:
    assert no_valid_host([host("h1", free_vcpus=0)], SMALL, "c1").message.endswith(
        ": 1 host, 1 short of vCPUs"
    )
