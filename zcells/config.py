"""Cell configuration: a nova.conf-style INI file read into frozen dataclasses.

Rules kept here:

* Every option has a section, an INI key, a type, a default and a help line,
  all in the single table `OPTIONS`; the reference in docs is generated from it.
* A bad value fails with `ConfigError` naming the file, section, key, value and
  what was expected. Nothing is read from a global: `load_config` returns a
  `Config` that callers pass along.
* Configuration fails closed: an unknown key in a zcells section is a
  `ConfigError` naming the file, section, key and the nearest valid key, so a
  typo never leaves a cell running on a default. Keys from nova's ``[cells]``
  section that zcells has no use for (``enable``, ``topic``, ...) are the one
  exception: accepted and reported as warnings, so an operator's existing
  section carries over. A section zcells does not know is a warning.
* Relative paths in a file are relative to that file's directory.
* With no file at all (the embedded default) the cell is an API cell named
  ``api`` on loopback, with its state under ``$ZCELLS_STATE_DIR`` or
  ``~/.local/state/zcells``.
"""

from __future__ import annotations

import configparser
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from zcells import config_values as parsers
from zcells.cellfilters import FILTERS, WEIGHERS, resolve
from zcells.config_values import parse_capabilities
from zcells.errors import ConfigError

CONFIG_ENV: Final = "ZCELLS_CONFIG"
STATE_DIR_ENV: Final = "ZCELLS_STATE_DIR"
EMBEDDED: Final = "<embedded defaults>"


CELL_TYPES: Final = ("api", "compute")
COMPUTE_DRIVERS: Final = ("fake",)
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

# nova-cells [cells] keys that have no meaning here; accepted, then reported.
NOVA_ONLY_KEYS: Final = frozenset(
    {
        "topic",
        "manager",
        "driver",
        "rpc_driver_queue_base",
        "scheduler",
        "scheduler_filter_classes",
        "scheduler_weight_classes",
        "cells_config",
        "instance_update_sync_database_limit",
        "bandwidth_update_interval",
        "enable_bandwidth_reports",
        "cell_type_compat",
    }
)


Parser = parsers.Parser


@dataclass(frozen=True)
class Option:
    """One configuration key: where it lives, how to read it, its default."""

    section: str
    key: str
    parse: Parser
    default: Any
    expected: str
    help: str
    attr: str = ""

    @property
    def field_name(self) -> str:
        return self.attr or self.key


_SECONDS = "a number of seconds"
_BIND_ENDPOINT = "a bind endpoint: tcp://HOST:PORT (HOST may be * or 0.0.0.0) or ipc:///PATH"

OPTIONS: Final[tuple[Option, ...]] = (
    # [cells]
    Option(
        "cells",
        "name",
        parsers.name_value,
        "api",
        "a cell name: letters, digits, '_', '.', '-' (1-64)",
        "This cell's own name; its full name is its parents' names and this, joined by '!'.",
    ),
    Option(
        "cells",
        "cell_type",
        parsers.choice_value(CELL_TYPES),
        "api",
        "api or compute",
        "api: the top cell that takes client requests; compute: a cell with hosts.",
    ),
    Option(
        "cells",
        "capabilities",
        parse_capabilities,
        {},
        "key=value;value pairs separated by commas, e.g. hypervisor=kvm;xen, os=linux",
        "Capabilities of this cell, announced to its parent and matched against image"
        " properties (hypervisor=..., architecture=..., hypervisor_version=...).",
    ),
    Option(
        "cells",
        "call_timeout",
        parsers.float_value(0.001),
        60.0,
        _SECONDS,
        "How long a call to another cell waits for its response.",
        "call_timeout_s",
    ),
    Option(
        "cells",
        "max_hop_count",
        parsers.int_value(1, 64),
        10,
        "an integer from 1 to 64",
        "A message that has crossed this many cells is failed, not forwarded.",
    ),
    Option(
        "cells",
        "reserve_percent",
        parsers.float_value(0.0, 100.0),
        10.0,
        "a percentage from 0 to 100",
        "Share of each host's RAM, disk and vCPUs kept out of the capacity this cell announces.",
    ),
    Option(
        "cells",
        "enable",
        parsers.bool_value,
        True,
        "true or false",
        "false: this cell takes no new builds; its parent's cell scheduler passes it over.",
    ),
    Option(
        "cells",
        "capability_interval",
        parsers.float_value(1.0),
        60.0,
        _SECONDS,
        "How often a cell announces its capacities and capabilities to its parent, besides"
        " soon after each change and whenever the link comes up.",
        "capability_interval_s",
    ),
    Option(
        "cells",
        "scheduler_filters",
        parsers.names_value(lambda names: resolve(names, FILTERS)),
        tuple(FILTERS),
        "filter names separated by commas: " + ", ".join(FILTERS) + " (or nova's class names)",
        "The cell scheduler's filters, in the order they are applied.",
    ),
    Option(
        "cells",
        "scheduler_weighers",
        parsers.names_value(lambda names: resolve(names, WEIGHERS)),
        tuple(WEIGHERS),
        "weigher names separated by commas: " + ", ".join(WEIGHERS) + " (or nova's class names)",
        "The cell scheduler's weighers.",
    ),
    Option(
        "cells",
        "ram_weight_multiplier",
        parsers.float_value(-1e9, 1e9),
        10.0,
        "a number",
        "Multiplier of the RAM units weigher; positive spreads builds in proportion to room,"
        " negative fills the fullest cell first.",
    ),
    Option(
        "cells",
        "offset_weight_multiplier",
        parsers.float_value(-1e9, 1e9),
        1.0,
        "a number",
        "Multiplier of the weight offset weigher (`zcells cell update --weight-offset`).",
    ),
    Option(
        "cells",
        "mute_weight_multiplier",
        parsers.float_value(-1e9, 1e9),
        -10000.0,
        "a number",
        "Multiplier of the mute child weigher: how far down a child not heard from goes.",
    ),
    Option(
        "cells",
        "mute_child_interval",
        parsers.float_value(0.001),
        300.0,
        _SECONDS,
        "A neighbour not heard from for this long is mute: shown as such and offered no builds.",
        "mute_child_interval_s",
    ),
    Option(
        "cells",
        "heartbeat_interval",
        parsers.float_value(0.001),
        5.0,
        _SECONDS,
        "How often each link sends a heartbeat; a neighbour silent for three of them is late.",
        "heartbeat_interval_s",
    ),
    Option(
        "cells",
        "max_clock_skew",
        parsers.float_value(1.0),
        300.0,
        _SECONDS,
        "A request stamped further than this from this cell's clock is refused as stale.",
        "max_clock_skew_s",
    ),
    Option(
        "cells",
        "db_check_interval",
        parsers.float_value(0.001),
        60.0,
        _SECONDS,
        "How often the cells and clients tables are re-read for changes.",
        "db_check_interval_s",
    ),
    Option(
        "cells",
        "scheduler_retries",
        parsers.int_value(0),
        10,
        "an integer >= 0",
        "How many more times the API cell tries to place a build after its first try fails.",
    ),
    Option(
        "cells",
        "scheduler_retry_delay",
        parsers.float_value(0.0),
        2.0,
        _SECONDS,
        "Pause before each further try to place a build.",
        "scheduler_retry_delay_s",
    ),
    Option(
        "cells",
        "instance_updated_at_threshold",
        parsers.float_value(0.0),
        3600.0,
        _SECONDS,
        "The periodic heal resends instances changed within this window.",
        "instance_updated_at_threshold_s",
    ),
    Option(
        "cells",
        "instance_update_num_instances",
        parsers.int_value(0),
        1,
        "an integer >= 0",
        "How many instances the periodic heal resends per run.",
    ),
    Option(
        "cells",
        "instance_update_interval",
        parsers.float_value(0.0),
        60.0,
        _SECONDS,
        "How often the periodic heal runs; 0 turns it off.",
        "instance_update_interval_s",
    ),
    Option(
        "cells",
        "request_id_keep",
        parsers.float_value(60.0),
        86400.0,
        _SECONDS,
        "How long a repeated request id answers its first result instead of running again.",
        "request_id_keep_s",
    ),
    # [transport]
    Option(
        "transport",
        "cells_endpoint",
        parsers.endpoint_value,
        "tcp://127.0.0.1:7750",
        _BIND_ENDPOINT,
        "Where children connect (ROUTER, CURVE server).",
    ),
    Option(
        "transport",
        "api_endpoint",
        parsers.endpoint_value,
        "tcp://127.0.0.1:7751",
        _BIND_ENDPOINT,
        "Where clients connect (ROUTER, CURVE server).",
    ),
    Option(
        "transport",
        "keys_dir",
        parsers.path_value,
        None,
        "a directory path",
        "Directory of CURVE key files, mode 0700. Default: STATE_DIR/keys.",
    ),
    Option(
        "transport",
        "max_message_bytes",
        parsers.int_value(1024, 64 << 20),
        1 << 20,
        "an integer from 1024 to 67108864",
        "Largest frame a peer may send.",
    ),
    Option(
        "transport",
        "max_in_flight",
        parsers.int_value(1, 100_000),
        256,
        "an integer from 1 to 100000",
        "Requests one peer may have in progress here before it gets E_BUSY.",
    ),
    Option(
        "transport",
        "handshake_timeout",
        parsers.float_value(0.1, 600.0),
        5.0,
        _SECONDS,
        "A connection that has not finished its CURVE handshake by then is closed.",
        "handshake_timeout_s",
    ),
    # [database]
    Option(
        "database",
        "connection",
        parsers.text_value,
        None,
        "an SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE",
        "The cell's own database. Default: sqlite:///STATE_DIR/NAME.db.",
    ),
    Option(
        "database",
        "busy_timeout",
        parsers.float_value(0.0),
        5.0,
        _SECONDS,
        "How long a write waits for a locked SQLite database.",
        "busy_timeout_s",
    ),
    # [quota]
    Option(
        "quota",
        "servers",
        parsers.int_value(-1, 1 << 40),
        10,
        "an integer from -1 (no limit) up",
        "Servers a project may hold (not deleted), unless an admin set its own.",
    ),
    Option(
        "quota",
        "vcpus",
        parsers.int_value(-1, 1 << 40),
        20,
        "an integer from -1 (no limit) up",
        "vCPUs a project's servers may hold in all.",
    ),
    Option(
        "quota",
        "ram_mb",
        parsers.int_value(-1, 1 << 40),
        51200,
        "an integer from -1 (no limit) up",
        "MB of RAM a project's servers may hold in all.",
    ),
    Option(
        "quota",
        "limit_admins",
        parsers.bool_value,
        False,
        "true or false",
        "Whether quotas also limit what an admin creates.",
    ),
    Option(
        "quota",
        "metadata_items",
        parsers.int_value(0, 64),
        64,
        "an integer from 0 to 64",
        "Metadata pairs one server may carry (keys and values up to 255 characters).",
    ),
    Option(
        "quota",
        "metadata_bytes",
        parsers.int_value(0, 1 << 20),
        16384,
        "an integer from 0 to 1048576",
        "UTF-8 bytes of one server's metadata keys and values in all.",
    ),
    # [compute]
    Option(
        "compute",
        "driver",
        parsers.choice_value(COMPUTE_DRIVERS),
        "fake",
        "fake",
        "How hosts are driven; 'fake' simulates hosts inside the cell process.",
    ),
    Option(
        "compute",
        "fake_hosts",
        parsers.int_value(0, 100_000),
        4,
        "an integer from 0 to 100000",
        "Number of simulated hosts in this cell.",
    ),
    Option(
        "compute",
        "fake_host_ram_mb",
        parsers.int_value(1),
        65536,
        "an integer >= 1",
        "RAM of each simulated host.",
    ),
    Option(
        "compute",
        "fake_host_disk_gb",
        parsers.int_value(1),
        1000,
        "an integer >= 1",
        "Disk of each simulated host.",
    ),
    Option(
        "compute",
        "fake_host_vcpus",
        parsers.int_value(1),
        32,
        "an integer >= 1",
        "vCPUs of each simulated host.",
    ),
    Option(
        "compute",
        "fake_build_seconds",
        parsers.float_value(0.0),
        1.0,
        _SECONDS,
        "How long a simulated build takes.",
        "fake_build_s",
    ),
    # [service]
    Option(
        "service",
        "state_dir",
        parsers.path_value,
        None,
        "a directory path",
        "Where the cell keeps its pid file, SQLite database and keys. "
        "Default: $ZCELLS_STATE_DIR or ~/.local/state/zcells.",
    ),
    Option(
        "service",
        "log_level",
        parsers.choice_value(LOG_LEVELS),
        "info",
        "debug, info, warning or error",
        "Least severe log level written.",
    ),
)


@dataclass(frozen=True)
class CellsConfig:
    name: str
    cell_type: str
    capabilities: Mapping[str, tuple[str, ...]]
    call_timeout_s: float
    max_hop_count: int
    reserve_percent: float
    enable: bool
    capability_interval_s: float
    scheduler_filters: tuple[str, ...]
    scheduler_weighers: tuple[str, ...]
    ram_weight_multiplier: float
    offset_weight_multiplier: float
    mute_weight_multiplier: float
    mute_child_interval_s: float
    heartbeat_interval_s: float
    max_clock_skew_s: float
    db_check_interval_s: float
    scheduler_retries: int
    scheduler_retry_delay_s: float
    instance_updated_at_threshold_s: float
    instance_update_num_instances: int
    instance_update_interval_s: float
    request_id_keep_s: float


@dataclass(frozen=True)
class TransportConfig:
    cells_endpoint: str
    api_endpoint: str
    keys_dir: Path
    max_message_bytes: int
    max_in_flight: int
    handshake_timeout_s: float


@dataclass(frozen=True)
class DatabaseConfig:
    connection: str
    busy_timeout_s: float


@dataclass(frozen=True)
class QuotaConfig:
    servers: int
    vcpus: int
    ram_mb: int
    limit_admins: bool
    metadata_items: int
    metadata_bytes: int


@dataclass(frozen=True)
class ComputeConfig:
    driver: str
    fake_hosts: int
    fake_host_ram_mb: int
    fake_host_disk_gb: int
    fake_host_vcpus: int
    fake_build_s: float


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: Path
    log_level: str


@dataclass(frozen=True)
class Config:
    """Everything a cell reads from its configuration, already checked."""

    source: str
    cells: CellsConfig
    transport: TransportConfig
    database: DatabaseConfig
    compute: ComputeConfig
    service: ServiceConfig
    quota: QuotaConfig
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def embedded(self) -> bool:
        """True when no file was read: the cell runs on built-in defaults."""
        return self.source == EMBEDDED

    @property
    def pid_file(self) -> Path:
        return self.service.state_dir / f"{self.cells.name}.pid"


SECTIONS: Final[dict[str, type[Any]]] = {
    "cells": CellsConfig,
    "transport": TransportConfig,
    "database": DatabaseConfig,
    "compute": ComputeConfig,
    "service": ServiceConfig,
    "quota": QuotaConfig,
}


def section_defaults(name: str) -> Any:
    """Section `name` with every option at its default, for code run without a file."""
    return SECTIONS[name](**{o.field_name: o.default for o in OPTIONS if o.section == name})


def default_state_dir(env: Mapping[str, str]) -> Path:
    if env.get(STATE_DIR_ENV):
        return Path(env[STATE_DIR_ENV]).expanduser()
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "zcells"


def _read_file(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, default_section="DEFAULT")
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle, source=str(path))
    except FileNotFoundError:
        raise ConfigError(str(path), "file", None, None, "an existing configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "file", None, None, f"a readable UTF-8 file ({exc})") from None
    except configparser.Error as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(str(path), "file", None, None, f"INI syntax ({message})") from None
    return parser


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read and check a configuration file; with no path, use ``$ZCELLS_CONFIG`` or defaults."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    warnings: list[str] = []
    source = EMBEDDED
    base_dir = Path.cwd()
    if path is not None:
        file_path = Path(path).expanduser()
        source = str(file_path)
        base_dir = file_path.resolve().parent
        parser = _read_file(file_path)
        known = {(o.section, o.key): o for o in OPTIONS}
        for section in parser.sections():
            if section not in SECTIONS:
                warnings.append(f"{source}: [{section}] is not a zcells section; ignored")
                continue
            for key, raw in parser.items(section, raw=True):
                if key in parser.defaults():
                    continue
                option = known.get((section, key))
                if option is None:
                    if section == "cells" and key in NOVA_ONLY_KEYS:
                        why = "a nova-cells option zcells does not use"
                        warnings.append(f"{source}: [{section}] {key}: {why}; ignored")
                        continue
                    raise ConfigError(source, section, key, None, _valid_keys(section, key))
                try:
                    value = option.parse(raw)
                except ValueError:
                    raise ConfigError(source, section, key, raw, option.expected) from None
                if isinstance(value, Path) and not value.is_absolute():
                    value = base_dir / value
                values[section][option.field_name] = value
    for option in OPTIONS:
        values[option.section].setdefault(option.field_name, option.default)
    _derive_defaults(values, env)
    sections = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    return Config(source=source, warnings=tuple(warnings), **sections)


def _valid_keys(section: str, key: str) -> str:
    """What `ConfigError` says for an unknown key: the nearest valid one, then all."""
    keys = sorted(o.key for o in OPTIONS if o.section == section)
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"a zcells option (did you mean {near[0]!r}?); " if near else "a zcells option; "
    return hint + f"[{section}] takes " + ", ".join(keys)


def _derive_defaults(values: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    """Fill the options whose default depends on other options."""
    service = values["service"]
    if service["state_dir"] is None:
        service["state_dir"] = default_state_dir(env)
    state_dir: Path = service["state_dir"]
    if values["transport"]["keys_dir"] is None:
        values["transport"]["keys_dir"] = state_dir / "keys"
    if values["database"]["connection"] is None:
        name = values["cells"]["name"]
        values["database"]["connection"] = f"sqlite:///{state_dir / name}.db"


def option_reference() -> list[dict[str, str]]:
    """The option table as rows for documentation: section, key, default, expected, help."""
    rows = []
    for option in OPTIONS:
        default = option.default
        if isinstance(default, dict):
            default = ", ".join(f"{k}={';'.join(v)}" for k, v in default.items())
        rows.append(
            {
                "section": option.section,
                "key": option.key,
                "default": "(derived)" if default is None else str(default),
                "expected": option.expected,
                "help": option.help,
            }
        )
    return rows
