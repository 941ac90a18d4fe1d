"""Parsers of configuration values: raw INI text in, a typed value out.

Each parser raises `ValueError` when the text is not what its option expects;
`zcells.config` turns that into a `ConfigError` naming the file, section,
key, value and the expectation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zcells.errors import ValidationError
from zcells.names import check_endpoint, check_name

Parser = Callable[[str], Any]


def int_value(low: int, high: int | None = None) -> Parser:
    def parse(text: str) -> int:
        value = int(text.strip())
        if value < low or (high is not None and value > high):
            raise ValueError
        return value

    return parse


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True}
_BOOLEANS.update({"false": False, "no": False, "off": False, "0": False})


def bool_value(text: str) -> bool:
    """true/false, yes/no, on/off or 1/0, in any case."""
    value = _BOOLEANS.get(text.strip().lower())
    if value is None:
        raise ValueError
    return value


def float_value(low: float, high: float | None = None) -> Parser:
    def parse(text: str) -> float:
        value = float(text.strip())
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise ValueError
        return value

    return parse


def choice_value(choices: tuple[str, ...]) -> Parser:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError
        return value

    return parse


def name_value(text: str) -> str:
    try:
        return check_name("cell name", text.strip())
    except ValidationError:
        raise ValueError from None


def endpoint_value(text: str) -> str:
    try:
        return check_endpoint("endpoint", text.strip(), bind=True)
    except ValidationError:
        raise ValueError from None


def text_value(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError
    return value


def path_value(text: str) -> Path:
    return Path(text_value(text)).expanduser()


def parse_capabilities(text: str) -> Mapping[str, tuple[str, ...]]:
    """``hypervisor=kvm;xen, os=linux`` -> ``{"hypervisor": ("kvm", "xen"), "os": ("linux",)}``."""
    result: dict[str, tuple[str, ...]] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = tuple(v.strip() for v in values.split(";") if v.strip())
        if not sep or not key or not parts or key in result:
            raise ValueError
        result[key] = parts
    return result


def names_value(resolve: Callable[[list[str]], tuple[str, ...]]) -> Parser:
    """A comma-separated list of names, each resolved (and checked) by `resolve`."""

    def parse(text: str) -> tuple[str, ...]:
        names = [item.strip() for item in text.split(",") if item.strip()]
        return resolve(names)

    return parse
