"""The tries of a build: the fault that sums them up, and the retry plan."""

from __future__ import annotations

import math

import pytest

from zcells.cellsched import (
    HERE,
    MAX_RETRIES,
    MAX_SUMMARY_LENGTH,
    BuildAttempts,
    retry_plan,
)

NVH = "E_NO_VALID_HOST"
UNREACHABLE = "E_UNREACHABLE"


def test_summary_lists_each_cell_with_its_last_error_in_first_tried_order() -> None:
    attempts = BuildAttempts()
    attempts.tried("c1", UNREACHABLE, "unreachable")
    attempts.tried("c2", UNREACHABLE, "unreachable")
    attempts.tried("c1", NVH, "no valid host in api!c1 for 2048 MB RAM: 4 hosts, 4 disabled")
    assert attempts.summary() == (
        "no cell could take the instance after 3 attempts: "
        "c1: no valid host in api!c1 for 2048 MB RAM: 4 hosts, 4 disabled; c2: unreachable"
    )


def test_summary_names_this_cell_and_keeps_to_one_line() -> None:
    attempts = BuildAttempts()
    attempts.tried(HERE, NVH, "no valid host in api!c1\nfor 512 MB RAM:\tthe cell has no hosts")
    assert attempts.summary() == (
        "no cell could take the instance after 1 attempt: "
        "this cell: no valid host in api!c1 for 512 MB RAM: the cell has no hosts"
    )


def test_summary_with_no_attempts() -> None:
    summary = BuildAttempts().summary()
    assert summary == "no cell could take the instance: no enabled, reachable cell to try"


def test_summary_is_capped_with_an_ellipsis() -> None:
    attempts = BuildAttempts()
    for i in range(40):
        attempts.tried(f"c{i}", NVH, "no valid host in api!c" + "x" * 60)
    summary = attempts.summary()
    assert len(summary) == MAX_SUMMARY_LENGTH
    assert summary.startswith("no cell could take the instance after 40 attempts: c0: ")
    assert summary.endswith("...")


def test_summary_just_under_the_cap_is_kept_whole() -> None:
    attempts = BuildAttempts()
    head = "no cell could take the instance after 1 attempt: c1: "
    attempts.tried("c1", NVH, "x" * (MAX_SUMMARY_LENGTH - len(head)))
    summary = attempts.summary()
    assert len(summary) == MAX_SUMMARY_LENGTH
    assert summary.endswith("x")


def test_all_no_valid_host_when_every_cell_last_said_so() -> None:
    attempts = BuildAttempts()
    assert not attempts.all_no_valid_host()
    attempts.tried("c1", NVH, "no valid host")
    attempts.tried(HERE, NVH, "no valid host")
    assert attempts.all_no_valid_host()
    attempts.tried("c2", UNREACHABLE, "unreachable")
    assert not attempts.all_no_valid_host()


def test_all_no_valid_host_reads_each_cells_last_error() -> None:
    attempts = BuildAttempts()
    attempts.tried("c1", UNREACHABLE, "unreachable")
    attempts.tried("c1", NVH, "no valid host")
    assert attempts.all_no_valid_host()
    attempts.tried("c1", "E_TIMEOUT", "no answer in time")
    assert not attempts.all_no_valid_host()


# -- retry_plan ------------------------------------------------------------------------------


def test_retry_plan_starts_at_once_then_waits_between_retries() -> None:
    assert retry_plan(0, 2.0) == [0.0]
    assert retry_plan(3, 2.0) == [0.0, 2.0, 2.0, 2.0]
    assert retry_plan(2, 0.0) == [0.0, 0.0, 0.0]


def test_retry_plan_is_bounded() -> None:
    assert len(retry_plan(10**9, 1.0)) == MAX_RETRIES + 1
    assert retry_plan(-5, 1.0) == [0.0]


@pytest.mark.parametrize("delay_s", [-1.0, math.inf, math.nan])
def test_retry_plan_refuses_a_delay_that_is_not_a_time(delay_s: float) -> None:
    with pytest.raises(ValueError, match="retry delay"):
        retry_plan(1, delay_s)
