from __future__ import annotations

import pytest

from zcells.errors import ValidationError
from zcells.names import check_cell_path, check_endpoint, check_name, join_cell_path


@pytest.mark.parametrize("name", ["api", "eu-west-2", "a.b_c", "x" * 64, "0"])
def test_good_names(name: str) -> None:
    assert check_name("cell name", name) == name


@pytest.mark.parametrize("name", ["", "a!b", "x" * 65, "a b", "é", "a/b", "a:b", None, 5])
def test_bad_names(name: object) -> None:
    with pytest.raises(ValidationError) as info:
        check_name("cell name", name)  # type: ignore[arg-type]
    assert info.value.field == "cell name"
    assert "no '!'" in str(info.value)


def test_cell_paths_round_trip() -> None:
    assert check_cell_path("api!eu!eu-1") == ("api", "eu", "eu-1")
    assert join_cell_path(("api", "eu")) == "api!eu"
    for bad in ("", "api!!eu", "api!", "!api", "api!e u"):
        with pytest.raises(ValidationError):
            check_cell_path(bad)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:7750",
        "tcp://[::1]:7750",
        "tcp://cells.example.org:1",
        "tcp://h:65535",
        "ipc:///run/zcells/api.sock",
    ],
)
def test_good_endpoints(endpoint: str) -> None:
    assert check_endpoint("endpoint", endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "",
        "127.0.0.1:7750",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:x",
        "udp://127.0.0.1:1",
        "tcp://[::zz]:1",
        "tcp://*:7750",
        "tcp://bad_host:1",
        "tcp://-x:1",
        "ipc://relative",
        "tcp://999.1.1.1:5",
    ],
)
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_endpoint("endpoint", endpoint)
    assert info.value.field == "endpoint"


def test_bind_endpoints_allow_wildcards() -> None:
    assert check_endpoint("e", "tcp://*:7750", bind=True) == "tcp://*:7750"
    assert check_endpoint("e", "tcp://0.0.0.0:7750", bind=True) == "tcp://0.0.0.0:7750"
