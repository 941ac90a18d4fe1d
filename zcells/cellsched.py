"""The tries of a build: how many, how far apart, and what the fault says when all fail.

Pure: no I/O and no clock. Which cell is tried in which order is the cell
scheduler's (`zcells.cellfilters`, `zcells.scheduling`); `HERE` names this
cell's own hosts among the candidates.

Rules kept here:

1. A build tries a first time and then at most `retries` more times, each
   after `delay_s` (`retry_plan`, nova's `scheduler_retries`); the number of
   tries is capped at `MAX_RETRIES` + 1 whatever the configuration says.
2. `BuildAttempts` keeps what each try said, so that when every try fails the
   fault names each cell with its last error on one line of at most
   `MAX_SUMMARY_LENGTH` characters. The build failed for want of a host
   (`E_NO_VALID_HOST`) only when every cell tried last said so; otherwise no
   cell was available (`E_NO_CELLS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from zcells.errors import NoValidHost

HERE: Final = "."
MAX_RETRIES: Final = 100
MAX_SUMMARY_LENGTH: Final = 1000

_HERE_SHOWN: Final = "this cell"
_ELLIPSIS: Final = "..."


@dataclass(frozen=True)
class Attempt:
    """One try of a build in one cell, and how it failed."""

    cell: str
    code: str
    message: str


@dataclass
class BuildAttempts:
    """The failed tries of one build at one level of the tree, in the order they were made."""

    attempts: list[Attempt] = field(default_factory=list)

    def tried(self, name: str, error_code: str, message: str) -> None:
        self.attempts.append(Attempt(name, error_code, message))

    def last_per_cell(self) -> dict[str, Attempt]:
        """Each cell tried, in the order first tried, with its last error."""
        last: dict[str, Attempt] = {}
        for attempt in self.attempts:
            last[attempt.cell] = attempt
        return last

    def all_no_valid_host(self) -> bool:
        """Whether every cell tried had, at its last try, no host for the instance."""
        last = self.last_per_cell()
        return bool(last) and all(a.code == NoValidHost.code for a in last.values())

    def summary(self) -> str:
        """Why the build failed, on one line of at most `MAX_SUMMARY_LENGTH` characters."""
        if not self.attempts:
            return "no cell could take the instance: no enabled, reachable cell to try"
        count = len(self.attempts)
        tries = "1 attempt" if count == 1 else f"{count} attempts"
        reasons = "; ".join(
            f"{_HERE_SHOWN if cell == HERE else cell}: {_one_line(attempt.message)}"
            for cell, attempt in self.last_per_cell().items()
        )
        text = f"no cell could take the instance after {tries}: {reasons}"
        if len(text) > MAX_SUMMARY_LENGTH:
            text = text[: MAX_SUMMARY_LENGTH - len(_ELLIPSIS)] + _ELLIPSIS
        return text


def retry_plan(retries: int, delay_s: float) -> list[float]:
    """The pause before each try of a build: none before the first, `delay_s` before each retry.

    `retries` counts the tries after the first, capped at `MAX_RETRIES`.
    """
    if not math.isfinite(delay_s) or delay_s < 0:
        raise ValueError(f"retry delay must be a finite number of seconds >= 0, not {delay_s}")
    return [0.0] + [delay_s] * max(0, min(retries, MAX_RETRIES))


def _one_line(message: str) -> str:
    # Messages come from other cells; a newline or tab in one must not break the fault's line.
    return " ".join(message.split())
