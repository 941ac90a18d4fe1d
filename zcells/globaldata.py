"""Global data: the flavors and images the API cell owns, as they flow down the tree.

Rules kept here (DESIGN.md §5):

* A flavor or an image is checked here before anything is written, the same
  way whether a client gave it to the API cell or a parent sent it down.
* A change travels as a row of the global log: its seq, its kind, the name it
  is about, and the record as it is now (None: deleted). The seq is the API
  cell's and every cell below keeps it, so a middle cell streams on to its
  children exactly the rows it applied.
* A batch from the wire is taken whole or not at all: one malformed row (a
  type, a kind, a name, a bound, a seq that does not rise, a record that does
  not name its row) refuses the batch with `SchemaError`, naming the row.
* Everything is bounded: rows per batch, properties per image, the length of
  each key and value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from zcells.cellfilters import IMAGE_PROPERTIES
from zcells.errors import SchemaError, UsageError, ValidationError
from zcells.names import check_name
from zcells.records import Flavor, Image

FLAVOR: Final = "flavor"
IMAGE: Final = "image"
KINDS: Final = (FLAVOR, IMAGE)

# As the outbox's: a signed 64-bit column with room to spare.
MAX_SEQ: Final = (1 << 62) - 1
MAX_ROWS: Final = 500  # rows in one `global_updates` batch
MAX_PROPERTIES: Final = 32
MAX_KEY_LENGTH: Final = 64
MAX_VALUE_LENGTH: Final = 255
MAX_FLAVOR_SIZE: Final = 1 << 31  # RAM in MB, disk in GB, vCPUs: inside an Integer column

_KEY_RE: Final = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_KEY_LENGTH}}}")
_KEY_EXPECTED: Final = f"1-{MAX_KEY_LENGTH} characters of letters, digits, '_', '.', ':' or '-'"
_WORD_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_VERSION_RE: Final = re.compile(r"(>=|<=|==|>|<)?\s*\d{1,9}(\.\d{1,9}){0,7}")
# Values the cell scheduler reads must be ones it can match; others are free text.
_SCHEDULER_VALUES: Final = {
    "hypervisor_type": (_WORD_RE, "a hypervisor name such as kvm"),
    "architecture": (_WORD_RE, "an architecture name such as x86_64"),
    "hypervisor_version_requires": (_VERSION_RE, "a version with an operator, such as >=6.0"),
}


@dataclass(frozen=True)
class Change:
    """One row of the global log: a flavor or an image as it is now, or its delete."""

    seq: int
    kind: str
    name: str
    record: Flavor | Image | None  # None: deleted

    @property
    def deleted(self) -> bool:
        return self.record is None

    def to_wire(self) -> list[Any]:
        record = None if self.record is None else self.record.as_dict()
        return [self.seq, self.kind, self.name, record]


# -- checks ---------------------------------------------------------------------------------


def check_flavor(flavor: Flavor) -> Flavor:
    """A flavor with a valid name and sizes; `ValidationError` naming the field otherwise."""
    check_name("flavor name", flavor.name)
    for field, value, least in (
        ("RAM (MB)", flavor.memory_mb, 1),
        ("disk (GB)", flavor.disk_gb, 0),
        ("vCPUs", flavor.vcpus, 1),
    ):
        if type(value) is not int or not least <= value < MAX_FLAVOR_SIZE:
            raise ValidationError(field, value, "a positive whole number")
    return flavor


def check_properties(raw: Mapping[Any, Any]) -> dict[str, str]:
    """Image properties: at most `MAX_PROPERTIES` text pairs, the scheduler's own well-formed."""
    if len(raw) > MAX_PROPERTIES:
        raise ValidationError("properties", f"{len(raw)} items", f"at most {MAX_PROPERTIES}")
    properties: dict[str, str] = {}
    for key, value in raw.items():
        if type(key) is not str or not _KEY_RE.fullmatch(key):
            raise ValidationError("property key", key, _KEY_EXPECTED)
        if type(value) is not str or len(value) > MAX_VALUE_LENGTH or not value.isprintable():
            raise ValidationError(
                f"property {key}", value, f"printable text of at most {MAX_VALUE_LENGTH} characters"
            )
        rule = _SCHEDULER_VALUES.get(key) if key in IMAGE_PROPERTIES else None
        if rule is not None and not rule[0].fullmatch(value):
            raise ValidationError(f"property {key}", value, rule[1])
        properties[key] = value
    return dict(sorted(properties.items()))


def check_image(image: Image) -> Image:
    """An image with a valid name and properties (sorted by key)."""
    check_name("image name", image.name)
    if not isinstance(image.properties, Mapping):
        raise ValidationError("properties", image.properties, "a map of text to text")
    return Image(image.name, check_properties(image.properties))


# -- the wire -------------------------------------------------------------------------------


def flavor_from_wire(raw: Any) -> Flavor:
    """A flavor as `Flavor.as_dict` made it; `SchemaError` otherwise."""
    if type(raw) is not dict or set(raw) != {"name", "memory_mb", "disk_gb", "vcpus"}:
        raise SchemaError("a flavor is {name, memory_mb, disk_gb, vcpus}")
    try:
        return check_flavor(Flavor(raw["name"], raw["memory_mb"], raw["disk_gb"], raw["vcpus"]))
    except UsageError as exc:
        raise SchemaError(f"flavor: {exc}") from None


def image_from_wire(raw: Any) -> Image:
    """An image as `Image.as_dict` made it; `SchemaError` otherwise."""
    if type(raw) is not dict or set(raw) != {"name", "properties"}:
        raise SchemaError("an image is {name, properties}")
    if type(raw["properties"]) is not dict:
        raise SchemaError("image: properties must be a map")
    try:
        return check_image(Image(raw["name"], raw["properties"]))
    except UsageError as exc:
        raise SchemaError(f"image: {exc}") from None


def record_from_wire(kind: str, raw: Any) -> Flavor | Image:
    return flavor_from_wire(raw) if kind == FLAVOR else image_from_wire(raw)


def check_rows(raw: Any) -> list[Change]:
    """A `global_updates` batch: 1 to `MAX_ROWS` rows [seq, kind, name, record | nil].

    Seqs rise; `SchemaError` naming the first bad row otherwise.
    """
    if type(raw) is not list or not 0 < len(raw) <= MAX_ROWS:
        raise SchemaError(f"global_updates: rows must be a list of 1 to {MAX_ROWS} rows")
    changes: list[Change] = []
    previous = 0
    for index, row in enumerate(raw):
        changes.append(_check_row(index, row, previous))
        previous = changes[-1].seq
    return changes


def _check_row(index: int, row: Any, previous: int) -> Change:
    where = f"global_updates: row {index}"
    if type(row) is not list or len(row) != 4:
        raise SchemaError(f"{where} is not [seq, kind, name, record]")
    seq, kind, name, record = row
    if type(seq) is not int or not previous < seq <= MAX_SEQ:
        raise SchemaError(f"{where}: seqs must rise, from 1 to {MAX_SEQ}")
    if type(kind) is not str or kind not in KINDS:
        raise SchemaError(f"{where}: kind must be one of {', '.join(KINDS)}")
    try:
        check_name(f"{kind} name", name)
    except UsageError as exc:
        raise SchemaError(f"{where}: {exc}") from None
    if record is None:
        return Change(seq, kind, name, None)
    try:
        made = record_from_wire(kind, record)
    except SchemaError as exc:
        raise SchemaError(f"{where}: {exc.message}") from None
    if made.name != name:
        raise SchemaError(f"{where}: the record names {made.name!r}, the row {name!r}")
    return Change(seq, kind, name, made)
