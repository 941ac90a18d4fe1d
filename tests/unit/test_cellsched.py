"""The cell scheduler with seeded random generators: eligibility, distribution, faults, retries."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from zcells.cellsched import (
    HERE,
    MAX_RETRIES,
    MAX_SUMMARY_LENGTH,
    BuildAttempts,
    Candidate,
    CellScheduler,
    RandomCellScheduler,
    retry_plan,
)

NVH = "E_NO_VALID_HOST"
UNREACHABLE = "E_UNREACHABLE"

MIXED = [
    Candidate("c1", enabled=True, reachable=True),
    Candidate("c2", enabled=False, reachable=True),
    Candidate("c3", enabled=True, reachable=False),
    Candidate("c4", enabled=False, reachable=False),
    Candidate("c5", enabled=True, reachable=True),
    Candidate(HERE, enabled=True, reachable=True),
]


def scheduler(seed: int) -> CellScheduler:
    return RandomCellScheduler(random.Random(seed))


def test_never_returns_disabled_unreachable_or_excluded_names() -> None:
    for seed in range(50):
        assert sorted(scheduler(seed).order(MIXED, exclude=())) == [".", "c1", "c5"]
        assert sorted(scheduler(seed).order(MIXED, exclude={"c5", "c2"})) == [".", "c1"]
        assert scheduler(seed).order(MIXED, exclude={"c1", "c5", HERE}) == []


def test_nothing_to_order() -> None:
    assert scheduler(0).order([], exclude=()) == []
    off = [Candidate("c1", enabled=False, reachable=True)]
    assert scheduler(0).order(off, exclude=()) == []


def test_a_name_listed_twice_is_offered_once() -> None:
    twice = [Candidate("c1", True, True), Candidate("c1", True, True)]
    assert scheduler(0).order(twice, exclude=()) == ["c1"]


def test_same_seed_same_order_whatever_order_the_candidates_came_in() -> None:
    candidates = [Candidate(f"c{i}", True, True) for i in range(8)]
    for seed in range(20):
        forward = scheduler(seed).order(candidates, exclude=())
        backward = scheduler(seed).order(list(reversed(candidates)), exclude=())
        assert forward == backward


def test_every_order_of_three_candidates_is_drawn_evenly_across_seeds() -> None:
    candidates = [Candidate(name, True, True) for name in ("c1", "c2", HERE)]
    runs = 600
    counts = dict.fromkeys(itertools.permutations(sorted(c.name for c in candidates)), 0)
    for seed in range(runs):
        counts[tuple(scheduler(seed).order(candidates, exclude=()))] += 1
    assert len(counts) == 6
    # Each of the 6 orders expects 100 of 600; a fair shuffle stays far inside 50..150.
    assert all(50 < n < 150 for n in counts.values()), counts


def test_one_scheduler_keeps_drawing_from_its_generator() -> None:
    candidates = [Candidate(name, True, True) for name in ("a", "b", "c", "d")]
    sched = scheduler(7)
    orders = {tuple(sched.order(candidates, exclude=())) for _ in range(50)}
    assert len(orders) > 1


# -- BuildAttempts ---------------------------------------------------------------------------


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
