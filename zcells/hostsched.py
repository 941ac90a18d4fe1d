"""The host scheduler of a compute cell: which of its hosts can take an instance, best first.

Pure: the caller passes the hosts as its database holds them now, and claims
the chosen host itself.

Rules kept here:

1. A host passes when it is enabled and its free RAM, disk and vCPUs each
   cover what the flavor needs (nova's enabled, RAM, disk and core filters).
   The filters are one table, `FILTERS`, read in order both to choose and to
   explain a refusal.
2. Passing hosts are weighed by most free RAM, then most free vCPUs; equal
   weights go by host name, so the same hosts always come out in the same
   order.
3. Every passing host is returned, not only the best: a concurrent build may
   claim the first one before this one does, and the caller then tries the
   next.
4. When no host can take the instance, `no_valid_host` says why in words an
   operator can act on: each host is counted once, under the first filter it
   fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from zcells.errors import NoValidHost
from zcells.records import Flavor, Host, Resources

HostFilter = Callable[[Host, Resources], bool]


def _enabled(host: Host, need: Resources) -> bool:
    return host.enabled


def _enough_ram(host: Host, need: Resources) -> bool:
    return need.memory_mb <= host.free.memory_mb


def _enough_disk(host: Host, need: Resources) -> bool:
    return need.disk_gb <= host.free.disk_gb


def _enough_vcpus(host: Host, need: Resources) -> bool:
    return need.vcpus <= host.free.vcpus


# (what a host that fails it is, the filter), in the order a refusal is explained.
FILTERS: Final[tuple[tuple[str, HostFilter], ...]] = (
    ("disabled", _enabled),
    ("short of RAM", _enough_ram),
    ("short of disk", _enough_disk),
    ("short of vCPUs", _enough_vcpus),
)
# A host that passes every filter yet ends up in a refusal lost its claim to
# another build between the read and the claim.
_PASSED: Final = "lost to concurrent claims"


def need_of(flavor: Flavor) -> Resources:
    """What one instance of `flavor` takes from a host."""
    return Resources(flavor.memory_mb, flavor.disk_gb, flavor.vcpus)


def choose_hosts(hosts: Sequence[Host], need: Resources) -> list[str]:
    """The names of every host that can take `need`, best first."""
    passing = [host for host in hosts if _first_failure(host, need) is None]
    passing.sort(key=_weight)
    return [host.name for host in passing]


def no_valid_host(hosts: Sequence[Host], need: Resources, cell: str) -> NoValidHost:
    """The error for a build no host of `cell` can take, counting why each host refused."""
    wanted = f"{need.memory_mb} MB RAM, {need.disk_gb} GB disk, {_plural(need.vcpus, 'vCPU')}"
    if not hosts:
        return NoValidHost(f"no valid host in {cell} for {wanted}: the cell has no hosts", cell)
    counts = dict.fromkeys([reason for reason, _ in FILTERS] + [_PASSED], 0)
    for host in hosts:
        counts[_first_failure(host, need) or _PASSED] += 1
    reasons = [f"{count} {reason}" for reason, count in counts.items() if count]
    why = ", ".join([_plural(len(hosts), "host"), *reasons])
    return NoValidHost(f"no valid host in {cell} for {wanted}: {why}", cell)


def _first_failure(host: Host, need: Resources) -> str | None:
    for reason, passes in FILTERS:
        if not passes(host, need):
            return reason
    return None


def _weight(host: Host) -> tuple[int, int, str]:
    # Sorted ascending, so the larger free amounts are negated to come first.
    free = host.free
    return (-free.memory_mb, -free.vcpus, host.name)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
