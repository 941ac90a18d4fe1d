"""Which faults a simulation injects, where and when: all chosen from the seed up front.

A fault spec names kinds and, optionally, how many of each start per
virtual minute: ``all`` (the default), ``none``, or a list such as
``partition:4,crash,loss:0.5``. A kind without a rate takes its default,
scaled by the size of the tree (the defaults are per 100 cells).

=============  ===============================================================
kind           what it does, for how long
=============  ===============================================================
delay          one link: 50-500 ms more latency, 5-60 s
loss           one link: 1-20% of messages dropped, 5-60 s
duplicate      one link: 1-10% of messages delivered twice, 5-60 s
reorder        one link: 10-200 ms of random latency each (overtaking), 5-60 s
partition      one link cut, 2-40 s (past 15 s the connection breaks)
clog           "swizzle-clog": 3-8 links cut one by one, then restored one by
               one in another random order
crash          one cell killed, restarted on its database 1-30 s later
freeze         one cell neither hears nor is heard, 2-30 s
skew           one cell's wall clock off by 0.1-1.5 s, 10-120 s
=============  ===============================================================

Skews stay within the 2 s the cells trust their clocks to agree (NTP's
job; `zcells.builds` fences builds on it).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from zcells.errors import InvalidRequest

# Faults that start per virtual minute in a tree of 100 cells.
DEFAULT_PER_MINUTE: Final[Mapping[str, float]] = {
    "delay": 2.0,
    "loss": 2.0,
    "duplicate": 2.0,
    "reorder": 2.0,
    "partition": 2.0,
    "clog": 0.5,
    "crash": 1.0,
    "freeze": 1.0,
    "skew": 1.0,
}
KINDS: Final = tuple(DEFAULT_PER_MINUTE)


@dataclass(frozen=True)
class FaultSpec:
    per_minute: Mapping[str, float]

    def describe(self) -> str:
        return ",".join(f"{k}:{v:g}" for k, v in self.per_minute.items()) or "none"


def parse_faults(text: str, cells: int) -> FaultSpec:
    """A fault spec from its text; `InvalidRequest` names what is wrong."""
    scale = max(1.0, cells / 100.0)
    text = text.strip()
    if text == "none":
        return FaultSpec({})
    if text == "all":
        return FaultSpec({k: v * scale for k, v in DEFAULT_PER_MINUTE.items()})
    chosen: dict[str, float] = {}
    for part in text.split(","):
        kind, _, rate = part.strip().partition(":")
        if kind not in DEFAULT_PER_MINUTE:
            raise InvalidRequest(f"unknown fault {kind!r}: one of all, none, {', '.join(KINDS)}")
        try:
            value = float(rate) if rate else DEFAULT_PER_MINUTE[kind] * scale
        except ValueError:
            raise InvalidRequest(f"fault {kind}: rate {rate!r} is not a number") from None
        if not 0 <= value <= 10_000:
            raise InvalidRequest(f"fault {kind}: rate must be 0 to 10000 a minute")
        chosen[kind] = value
    return FaultSpec(chosen)


@dataclass(frozen=True)
class Fault:
    at: float  # virtual seconds after the start
    kind: str
    duration_s: float
    cell: str = ""  # crash, freeze, skew
    links: tuple[tuple[str, str], ...] = ()  # (child, parent) for link faults; clog: several
    amount: float = 0.0  # seconds of delay or skew, or a probability
    steps: tuple[float, ...] = field(default=(), compare=False)  # clog: gaps between cuts


def plan(
    spec: FaultSpec,
    rng: random.Random,
    duration_s: float,
    cells: Sequence[str],
    links: Sequence[tuple[str, str]],
) -> list[Fault]:
    """Every fault of a run, in time order. Nothing starts in the last tenth of the run."""
    faults: list[Fault] = []
    last = duration_s * 0.9
    for kind, per_minute in spec.per_minute.items():
        if per_minute <= 0 or (kind in ("crash", "freeze", "skew") and not cells):
            continue
        if kind not in ("crash", "freeze", "skew") and not links:
            continue
        at = rng.expovariate(per_minute / 60.0)
        while at < last:
            faults.append(_one(kind, at, rng, cells, links))
            at += rng.expovariate(per_minute / 60.0)
    faults.sort(key=lambda f: (f.at, f.kind))
    return faults


def _one(
    kind: str,
    at: float,
    rng: random.Random,
    cells: Sequence[str],
    links: Sequence[tuple[str, str]],
) -> Fault:
    if kind == "crash":
        return Fault(at, kind, rng.uniform(1.0, 30.0), cell=rng.choice(cells))
    if kind == "freeze":
        return Fault(at, kind, rng.uniform(2.0, 30.0), cell=rng.choice(cells))
    if kind == "skew":
        amount = rng.uniform(0.1, 1.5) * rng.choice((-1.0, 1.0))
        return Fault(at, kind, rng.uniform(10.0, 120.0), cell=rng.choice(cells), amount=amount)
    if kind == "clog":
        chosen = tuple(rng.sample(list(links), min(len(links), rng.randint(3, 8))))
        gaps = tuple(rng.uniform(0.5, 3.0) for _ in range(2 * len(chosen)))
        return Fault(at, kind, rng.uniform(5.0, 30.0), links=chosen, steps=gaps)
    link = (rng.choice(links),)
    if kind == "partition":
        return Fault(at, kind, rng.uniform(2.0, 40.0), links=link)
    amount = {
        "delay": lambda: rng.uniform(0.05, 0.5),
        "loss": lambda: rng.uniform(0.01, 0.2),
        "duplicate": lambda: rng.uniform(0.01, 0.1),
        "reorder": lambda: rng.uniform(0.01, 0.2),
    }[kind]()
    return Fault(at, kind, rng.uniform(5.0, 60.0), links=link, amount=amount)
