"""Every error zcells raises on purpose.

The tree::

    ZcellsError                       anything zcells means to raise
    ├── UsageError                    the operator asked for something invalid (exit 2)
    │   ├── ConfigError               a config file, section, key or value is wrong
    │   ├── ValidationError           a name, endpoint, key or option is malformed
    │   ├── KeyFileError              a key file is missing, loose, corrupt or mismatched
    │   ├── AlreadyExists             a registry row with that name or key exists
    │   └── NotFound                  no registry row with that name
    ├── DatabaseError                 the cell's database failed (exit 1)
    │   ├── DatabaseBusy              locked past the busy timeout; retry later
    │   ├── DatabaseFull              disk or quota full; nothing was written
    │   └── SchemaOutOfDate           the schema is behind the code; run `zcells db sync`
    └── ServiceError                  the daemon cannot run (exit 1)
        ├── EnvironmentMismatch       libzmq or msgpack too old, CURVE missing
        └── AlreadyRunning            another process holds the cell's pid file

A `UsageError` is something the person at the keyboard can fix by typing
something else; the command line prints it as one line and exits with status 2.
Everything else is the world misbehaving and exits with status 1.
"""

from __future__ import annotations


class ZcellsError(Exception):
    """Base of every error zcells raises on purpose."""

    exit_code = 1


class UsageError(ZcellsError):
    """The operator asked for something invalid; retyping fixes it."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value is wrong; names the file, section, key and value."""

    def __init__(
        self, path: str, section: str, key: str | None, value: str | None, expected: str
    ) -> None:
        self.path = path
        self.section = section
        self.key = key
        self.value = value
        self.expected = expected
        where = f"[{section}]" if key is None else f"[{section}] {key}"
        got = "" if value is None else f" = {value!r}"
        super().__init__(f"{path}: {where}{got}: expected {expected}")


class ValidationError(UsageError):
    """A single field is malformed; names the field, the value and what was expected."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        shown = value if isinstance(value, str) else repr(value)
        if isinstance(shown, str) and len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid {field} {shown!r}: expected {expected}")


class KeyFileError(UsageError):
    """A key file cannot be used; names the path and how to fix it."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}; {fix}")


class AlreadyExists(UsageError):
    """A registry row with that name or key already exists."""

    def __init__(self, what: str, field: str, value: str) -> None:
        self.what = what
        self.field = field
        self.value = value
        super().__init__(f"a {what} with {field} {value!r} already exists")


class NotFound(UsageError):
    """No registry row with that name."""

    def __init__(self, what: str, name: str) -> None:
        self.what = what
        self.name = name
        super().__init__(f"no {what} named {name!r}")


class DatabaseError(ZcellsError):
    """The cell's database failed; nothing from the failed transaction was kept."""


class DatabaseBusy(DatabaseError):
    """The database stayed locked past the busy timeout."""


class DatabaseFull(DatabaseError):
    """The disk or the database's size limit is full."""


class SchemaOutOfDate(DatabaseError):
    """The database schema is older (or newer) than this code."""


class ServiceError(ZcellsError):
    """The daemon cannot run in this environment."""


class EnvironmentMismatch(ServiceError):
    """A library is too old or lacks a feature zcells needs."""


class AlreadyRunning(ServiceError):
    """Another live process holds the cell's pid file."""
