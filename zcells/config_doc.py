"""The configuration reference of docs/operations.md, generated from `zcells.config.OPTIONS`.

Rules kept here:

* The option table is the only source: section, key, default, expectation and
  meaning are read from it, and the type and range from each option's own
  parser (its return type, and the bounds or choices it was built with), so
  the reference says what a cell enforces, not what someone remembered.
* The reference lives in the guide between two marker lines; `update` rewrites
  what lies between them and nothing else. A test regenerates it and fails
  when the guide differs.

Regenerate with ``make docs`` or ``python -m zcells.config_doc --update docs/operations.md``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from zcells.config import OPTIONS, SECTIONS, Option

BEGIN: Final = "<!-- BEGIN config reference (generated from zcells/config.py; do not edit) -->"
END: Final = "<!-- END config reference -->"
REGENERATE: Final = "make docs (or: python -m zcells.config_doc --update docs/operations.md)"

# A parser's return type, as written in its annotation -> the word the reference uses.
TYPE_NAMES: Final[Mapping[str, str]] = {
    "int": "integer",
    "float": "number",
    "str": "string",
    "Path": "path",
    "bool": "boolean",
    "Mapping": "key=values list",
    "tuple": "list of names",
}
_BUILDERS: Final = ("int_value", "float_value", "choice_value")


class GuideError(Exception):
    """The guide has no well-formed reference block, or an option cannot be described."""


def type_name(option: Option) -> str:
    """The option's type: from its parser's return annotation; seconds when its field says so."""
    annotation = inspect.signature(option.parse).return_annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    name = TYPE_NAMES.get(text.split("[", 1)[0])
    if name is None:
        raise GuideError(
            f"[{option.section}] {option.key}: its parser returns {text or 'nothing declared'}; "
            f"name that type in zcells.config_doc.TYPE_NAMES"
        )
    if name == "number" and option.field_name.endswith("_s"):
        return "seconds"
    return name


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def parser_bounds(option: Option) -> dict[str, Any]:
    """What the parser was built with: ``low`` and ``high``, or ``choices``; empty for others."""
    builder = option.parse.__qualname__.split(".", 1)[0]
    if builder not in _BUILDERS:
        return {}
    return dict(inspect.getclosurevars(option.parse).nonlocals)


def allowed(option: Option) -> str:
    """The values the option takes: a range, a list of choices, or the table's expectation."""
    bounds = parser_bounds(option)
    if "choices" in bounds:
        return ", ".join(f"`{choice}`" for choice in bounds["choices"])
    if "low" in bounds:
        low, high = bounds["low"], bounds.get("high")
        if high is None:
            return f"at least {_number(low)}"
        return f"{_number(low)} to {_number(high)}"
    return option.expected


def default_text(option: Option) -> str:
    """The default as an operator would write it in the file; derived ones say so."""
    default = option.default
    if default is None:
        return "*derived*"
    if isinstance(default, Mapping):
        if not default:
            return "*none*"
        return "`" + ", ".join(f"{k}={';'.join(v)}" for k, v in default.items()) + "`"
    if isinstance(default, float):
        return f"`{_number(default)}`"
    if isinstance(default, tuple):
        return "`" + ", ".join(default) + "`"
    return f"`{default}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The reference: one table per section, in the table's order, between the markers."""
    lines = [BEGIN, ""]
    for section in SECTIONS:
        lines += [
            f"### `[{section}]`",
            "",
            "| Key | Type | Default | Allowed | Meaning |",
            "| --- | --- | --- | --- | --- |",
        ]
        for option in OPTIONS:
            if option.section != section:
                continue
            row = (
                f"`{option.key}`",
                type_name(option),
                default_text(option),
                allowed(option),
                option.help,
            )
            lines.append("| " + " | ".join(_cell(part) for part in row) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def split(text: str) -> tuple[str, str, str]:
    """(before, the reference block with its markers, after) of a guide's text."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise GuideError(f"the guide must hold exactly one {BEGIN!r} and one {END!r} line")
    start, end = text.index(BEGIN), text.index(END)
    if end < start:
        raise GuideError(f"{END!r} comes before {BEGIN!r}")
    stop = end + len(END)
    after = text[stop:]
    after = after[1:] if after.startswith("\n") else after
    return text[:start], text[start:stop] + "\n", after


def update(path: Path) -> bool:
    """Rewrite the reference block of the guide at `path`; True when it changed."""
    text = path.read_text(encoding="utf-8")
    before, block, after = split(text)
    fresh = render()
    if block == fresh:
        return False
    path.write_text(before + fresh + after, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zcells.config_doc",
        description="Print the configuration reference, or rewrite it in a guide.",
    )
    parser.add_argument(
        "--update",
        metavar="FILE",
        type=Path,
        help="rewrite the block between the reference markers in FILE",
    )
    args = parser.parse_args(argv)
    if args.update is None:
        sys.stdout.write(render())
        return 0
    try:
        changed = update(args.update)
    except (OSError, GuideError) as exc:
        sys.stderr.write(f"zcells.config_doc: error: {args.update}: {exc}\n")
        return 1
    sys.stderr.write(f"{args.update}: {'updated' if changed else 'already up to date'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
