"""How alive a neighbour is, from when it was last heard: a transition table and a tracker.

States: ``unknown`` (never heard since this cell started) → ``alive`` (heard
within ``late_after_s``) → ``late`` (silent longer than that) → ``mute``
(silent longer than ``mute_child_interval``). Hearing from a neighbour makes
it alive again from any state. A mute neighbour stays in the tree: status
shows it red and the scheduler weighs it down, nothing drops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Liveness(StrEnum):
    UNKNOWN = "unknown"
    ALIVE = "alive"
    LATE = "late"
    MUTE = "mute"


class LinkEvent(StrEnum):
    HEARD = "heard"
    SILENT_LATE = "silent_late"
    SILENT_MUTE = "silent_mute"


class ImpossibleTransition(Exception):
    """A liveness event that cannot happen in the current state."""


TRANSITIONS: Final[dict[Liveness, dict[LinkEvent, Liveness]]] = {
    Liveness.UNKNOWN: {LinkEvent.HEARD: Liveness.ALIVE, LinkEvent.SILENT_MUTE: Liveness.MUTE},
    Liveness.ALIVE: {
        LinkEvent.HEARD: Liveness.ALIVE,
        LinkEvent.SILENT_LATE: Liveness.LATE,
        LinkEvent.SILENT_MUTE: Liveness.MUTE,
    },
    Liveness.LATE: {
        LinkEvent.HEARD: Liveness.ALIVE,
        LinkEvent.SILENT_LATE: Liveness.LATE,
        LinkEvent.SILENT_MUTE: Liveness.MUTE,
    },
    Liveness.MUTE: {LinkEvent.HEARD: Liveness.ALIVE, LinkEvent.SILENT_MUTE: Liveness.MUTE},
}


def next_state(state: Liveness, event: LinkEvent) -> Liveness:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise ImpossibleTransition(f"{event.value} cannot happen when {state.value}") from None


@dataclass
class Tracker:
    """The liveness of one neighbour. Time comes in as `now` (monotonic seconds)."""

    late_after_s: float
    mute_after_s: float
    since: float
    state: Liveness = Liveness.UNKNOWN
    last_heard: float | None = None

    def heard(self, now: float) -> Liveness:
        self.last_heard = now
        self.state = next_state(self.state, LinkEvent.HEARD)
        return self.state

    def check(self, now: float) -> Liveness:
        """Apply the silence so far; returns the state at `now`."""
        quiet_since = self.since if self.last_heard is None else self.last_heard
        silent = now - quiet_since
        if silent >= self.mute_after_s:
            self.state = next_state(self.state, LinkEvent.SILENT_MUTE)
        elif silent >= self.late_after_s and self.state in (Liveness.ALIVE, Liveness.LATE):
            self.state = next_state(self.state, LinkEvent.SILENT_LATE)
        return self.state

    def silent_for(self, now: float) -> float | None:
        return None if self.last_heard is None else now - self.last_heard
