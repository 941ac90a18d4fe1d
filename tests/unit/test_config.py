from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from zcells.config import EMBEDDED, OPTIONS, SECTIONS, load_config, parse_capabilities
from zcells.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cell.conf"
    path.write_text(text)
    return path


def test_option_table_matches_dataclasses() -> None:
    for name, cls in SECTIONS.items():
        declared = {f.name for f in fields(cls)}
        tabled = {o.field_name for o in OPTIONS if o.section == name}
        assert declared == tabled, name
    keys = [(o.section, o.key) for o in OPTIONS]
    assert len(keys) == len(set(keys))


def test_embedded_defaults_use_state_dir_env(tmp_path: Path) -> None:
    config = load_config(None, env={"ZCELLS_STATE_DIR": str(tmp_path)})
    assert config.source == EMBEDDED and config.embedded
    assert config.cells.name == "api" and config.cells.cell_type == "api"
    assert config.service.state_dir == tmp_path
    assert config.transport.keys_dir == tmp_path / "keys"
    assert config.database.connection == f"sqlite:///{tmp_path}/api.db"
    assert config.transport.api_endpoint.startswith("tcp://127.0.0.1:")
    assert config.pid_file == tmp_path / "api.pid"


def test_design_example_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[cells]
name = eu
cell_type = compute
capabilities = hypervisor=kvm;xen, os=linux
call_timeout = 60
max_hop_count = 10
reserve_percent = 10.0
mute_child_interval = 300
scheduler_retries = 10
scheduler_retry_delay = 2

[transport]
cells_endpoint = tcp://0.0.0.0:7750
api_endpoint = tcp://127.0.0.1:7751
keys_dir = keys

[database]
connection = sqlite:////var/lib/zcells/eu.db

[compute]
driver = fake
fake_hosts = 4
""",
    )
    config = load_config(path, env={})
    assert config.cells.name == "eu"
    assert config.cells.cell_type == "compute"
    assert dict(config.cells.capabilities) == {"hypervisor": ("kvm", "xen"), "os": ("linux",)}
    assert config.cells.call_timeout_s == 60.0
    assert config.cells.scheduler_retry_delay_s == 2.0
    assert config.transport.cells_endpoint == "tcp://0.0.0.0:7750"
    assert config.transport.keys_dir == tmp_path / "keys"  # relative to the file
    assert config.database.connection == "sqlite:////var/lib/zcells/eu.db"
    assert config.compute.fake_hosts == 4
    assert config.cells.reserve_percent == 10.0
    assert config.warnings == ()  # every option set is acted on


def test_config_env_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[cells]\nname = from-env\n")
    assert load_config(None, env={"ZCELLS_CONFIG": str(path)}).cells.name == "from-env"


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("cells", "name", "a!b", "a cell name"),
        ("cells", "name", "x" * 65, "a cell name"),
        ("cells", "cell_type", "region", "api or compute"),
        ("cells", "call_timeout", "soon", "a number of seconds"),
        ("cells", "call_timeout", "-1", "a number of seconds"),
        ("cells", "call_timeout", "nan", "a number of seconds"),
        ("cells", "max_hop_count", "0", "an integer from 1 to 64"),
        ("cells", "max_hop_count", "3.5", "an integer from 1 to 64"),
        ("cells", "reserve_percent", "101", "a percentage from 0 to 100"),
        ("cells", "capabilities", "hypervisor", "key=value"),
        ("cells", "capabilities", "a=b, a=c", "key=value"),
        ("transport", "api_endpoint", "http://x:1", "a bind endpoint"),
        ("transport", "cells_endpoint", "tcp://127.0.0.1:99999", "a bind endpoint"),
        ("compute", "driver", "libvirt", "fake"),
        ("compute", "fake_hosts", "-2", "an integer from 0 to 100000"),
        ("service", "log_level", "loud", "debug, info, warning or error"),
        ("database", "connection", "", "an SQLAlchemy URL"),
    ],
)
def test_bad_value_names_file_section_key_value_and_expectation(
    tmp_path: Path, section: str, key: str, value: str, expected: str
) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert (err.path, err.section, err.key, err.value) == (str(path), section, key, value)
    message = str(err)
    assert str(path) in message and f"[{section}] {key}" in message and expected in message


def test_missing_file_and_bad_syntax_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an existing configuration file"):
        load_config(tmp_path / "nope.conf", env={})
    path = write(tmp_path, "name = api\n")
    with pytest.raises(ConfigError, match="INI syntax"):
        load_config(path, env={})
    (tmp_path / "bin.conf").write_bytes(b"[cells]\nname = \xff\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(tmp_path / "bin.conf", env={})


def test_nova_keys_and_unknown_sections_warn_but_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[cells]\nenable = False\ntopic = cells\ncapabilities = os=linux\n"
        "[DEFAULT]\nverbose = true\n[weird]\nx = 1\n",
    )
    config = load_config(path, env={})
    text = "\n".join(config.warnings)
    assert "[cells] topic: a nova-cells option" in text
    assert "[weird] is not a zcells section" in text
    assert "capabilities" not in text
    assert config.cells.name == "api"
    assert config.cells.enable is False  # nova's key, read as "this cell takes no new builds"


def test_scheduler_filters_and_weighers_take_ours_and_nova_s_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[cells]\nscheduler_filters = TargetCellFilter, capacity, disabled\n"
        "scheduler_weighers = nova.cells.weights.weight_offset.WeightOffsetWeigher\n"
        "offset_weight_multiplier = 2.5\n",
    )
    cells = load_config(path, env={}).cells
    assert cells.scheduler_filters == ("target_cell", "capacity", "disabled")
    assert cells.scheduler_weighers == ("weight_offset",)
    assert cells.offset_weight_multiplier == 2.5
    bad = write(tmp_path, "[cells]\nscheduler_filters = capacity, NoSuchFilter\n")
    with pytest.raises(ConfigError, match="scheduler_filters"):
        load_config(bad, env={})


@pytest.mark.parametrize(
    ("section", "key", "nearest"),
    [("transport", "cels_endpoint", "cells_endpoint"), ("cells", "nmae", "name")],
)
def test_an_unknown_key_in_a_zcells_section_fails_naming_the_nearest(
    tmp_path: Path, section: str, key: str, nearest: str
) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = tcp://127.0.0.1:9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    message = str(caught.value)
    assert str(path) in message and f"[{section}] {key}" in message
    assert f"did you mean {nearest!r}?" in message


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(None, env={"ZCELLS_STATE_DIR": str(tmp_path)})
    with pytest.raises(AttributeError):
        config.cells.name = "other"  # type: ignore[misc]


def test_capabilities_parser() -> None:
    assert parse_capabilities("") == {}
    assert parse_capabilities(" os = linux ,hypervisor=kvm; xen") == {
        "os": ("linux",),
        "hypervisor": ("kvm", "xen"),
    }
    for bad in ("os", "=linux", "os=", "os=;"):
        with pytest.raises(ValueError):
            parse_capabilities(bad)
