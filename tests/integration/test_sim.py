"""`zcells sim`: small seeded trees under every fault find no violation, and a seed replays.

The runs are small (a dozen cells, two virtual minutes) so they fit `make
test`; `make soak` and `make bench-sim` run the thousand-cell tree.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from zcells.cli.sim import print_report
from zcells.db import hosts as hosts_store
from zcells.db import instances as store

from tests.unit.scripted_node import instance
from zcells.compute import fake_hosts
from zcells.instances import finish, placed
from zcells.sim import invariants
from zcells.sim.network import SimNetwork
from zcells.sim.run import Report, SimOptions, run
from zcells.sim.tree import Settings, Shape, SimTree
from zcells.sim.workload import Told

UUIDS = [f"00000000-0000-4000-8000-{i:012d}" for i in range(1, 5)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_a_small_tree_under_every_fault_keeps_every_invariant(seed: int, tmp_path: Path) -> None:
    options = SimOptions(
        cells=13, fanout=3, seed=seed, duration_s=120.0, clients=3, faults="all", db_dir=tmp_path
    )
    report = run(options)
    assert report.violations == 0, report.checks
    assert sum(report.faults.values()) >= 5  # the run was not quiet
    assert report.counts["servers_told"] >= 20
    assert report.counts["servers_deleted"] >= 1
    assert report.messages > 1000


def _sim(seed: int, tmp_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}  # it must fix it itself
    args = ["--cells", "10", "--fanout", "3", "--duration", "60", "--seed", str(seed)]
    done = subprocess.run(
        [sys.executable, "-m", "zcells.cli.app", "sim", *args, "--db-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "invariant servers: ok" in done.stdout
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


@pytest.mark.timeout(600)
def test_the_same_seed_replays_the_same_trace(tmp_path: Path) -> None:
    first = _sim(5, tmp_path / "a")
    again = _sim(5, tmp_path / "b")
    other = _sim(6, tmp_path / "c")
    assert {"seed", "cells", "trace_hash", "violations"} <= first.keys()
    assert first["violations"] == 0
    assert first["trace_hash"] == again["trace_hash"]
    assert first["faults"] == again["faults"]
    assert first["messages"] == again["messages"]
    assert other["trace_hash"] != first["trace_hash"]


def test_a_failing_run_names_what_broke_and_how_to_replay_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = Report(SimOptions(cells=50, seed=9, duration_s=30.0))
    report.checks = {"servers": ["x: alive in 2 cells"], "claims": []}
    print_report(report)
    out = capsys.readouterr().out
    assert "invariant servers: VIOLATED (1)" in out
    assert "  x: alive in 2 cells" in out
    assert "invariant claims: ok" in out
    assert "replay: zcells sim --cells 50 --fanout 10 --hosts 2 --seed 9 --duration 30" in out
    assert json.loads(out.strip().splitlines()[-1])["violations"] == 1


def test_the_invariants_name_each_thing_out_of_place(tmp_path: Path) -> None:
    """A tree built but not run, its databases written by hand into a broken state."""
    loop = asyncio.new_event_loop()
    try:
        network = SimNetwork(loop, random.Random(1))
        tree = SimTree(Shape.make(3, 2), Settings(), network, random.Random(1), tmp_path, 0.0)
        tree.build()
        top, c1, c2 = (tree.cells[n].db for n in ("api", "c1", "c2"))
        hosts_store.sync_hosts(c1, fake_hosts(1, 4096, 40, 4))
        built = finish(placed(instance(UUIDS[0]), "api!c1", "h001", 2.0), 3.0)
        assert store.index_put(c1, built)  # alive on h001, which claims nothing for it
        assert store.index_put(top, replace(built, version=built.version + 1))  # index ahead
        assert store.index_put(c2, finish(placed(instance(UUIDS[1]), "api!c2", "h1", 2.0), 3.0))
        told = Told(created={UUIDS[0]: "r0", UUIDS[2]: "r2", UUIDS[3]: "r2"}, deleted={UUIDS[0]})

        servers = invariants.servers(tree, told)
        assert any(f"{UUIDS[2]}: a client was told of it" in line for line in servers)
        stray = f"{UUIDS[1]}: alive in api!c2; the index has it under None"
        assert stray in servers
        assert any(line.startswith(f"{UUIDS[0]}: index ") for line in servers)
        assert f"request r2: answered with 2 servers: {[UUIDS[2], UUIDS[3]]}" in servers
        assert invariants.deletes(tree, told) == [
            f"{UUIDS[0]}: delete accepted; the index has it ACTIVE"
        ]
        assert invariants.claims(tree) == ["c1/h001: used (0, 0, 0), its servers need (512, 1, 1)"]
    finally:
        tree.close()
        loop.close()


def test_the_sequence_watch_sees_a_repeat_and_a_step_back() -> None:
    watch = invariants.SequenceWatch()
    from tests.fakes import child_request  # a valid request from a child, made to measure
    from zcells import codec

    def batch(rows: list[list[Any]]) -> list[bytes]:
        message = child_request(method="updates", body={"rows": rows})
        return codec.encode(message)

    watch.observe("c1", "api", batch([[1, "instance", b"a"], [2, "instance", b"b"]]))
    watch.observe("c1", "api", batch([[2, "instance", b"b"]]))  # sent again: fine
    assert watch.violations == []
    watch.observe("c1", "api", batch([[2, "instance", b"other"]]))
    watch.observe("c1", "api", batch([[5, "instance", b"e"]]))
    watch.observe("c1", "api", batch([[3, "instance", b"c"]]))  # new, yet below 5
    assert watch.violations == [
        "c1: sequence 2 sent with two contents",
        "c1: new row at 3, below one sent before",
    ]
