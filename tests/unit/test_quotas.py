"""The quota rules, with no database: limits merged over defaults, the first one passed named."""

from __future__ import annotations

import pytest

from zcells.errors import QuotaExceeded
from zcells.quotas import Quota, Usage, check_limit, enforce

NOVA = Quota(servers=10, vcpus=20, ram_mb=51200)


def test_a_projects_own_limits_replace_the_defaults() -> None:
    assert NOVA.merged({"vcpus": 4, "unknown": 1}) == Quota(10, 4, 51200)


@pytest.mark.parametrize(
    ("held", "wanted", "passed"),
    [
        (Usage(9, 0, 0), Usage(1, 0, 0), None),
        (Usage(9, 0, 0), Usage(2, 0, 0), "servers"),
        (Usage(0, 19, 0), Usage(1, 2, 0), "vcpus"),
        (Usage(0, 0, 51200), Usage(1, 0, 1), "ram_mb"),
    ],
)
def test_enforce_names_the_first_limit_passed(held: Usage, wanted: Usage, passed: str) -> None:
    if passed is None:
        enforce("p", NOVA, held, wanted)
        return
    with pytest.raises(QuotaExceeded, match=f"{passed} limit"):
        enforce("p", NOVA, held, wanted)


def test_minus_one_is_no_limit() -> None:
    enforce("p", Quota(-1, -1, -1), Usage(10**6, 10**6, 10**9), Usage(1, 1, 1))


@pytest.mark.parametrize("value", [-2, 1 << 41, True, 1.5])
def test_limits_out_of_range_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        check_limit("servers", value)  # type: ignore[arg-type]
