"""The configuration reference in docs/operations.md is the option table, rendered."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from zcells import config_doc
from zcells.config import OPTIONS, SECTIONS, Option

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operations.md"


def row_of(option: Option) -> str:
    """The reference's table row for `option`."""
    rendered = config_doc.render()
    heading = rendered.index(f"### `[{option.section}]`")
    start = rendered.index(f"\n| `{option.key}` |", heading) + 1
    return rendered[start : rendered.index("\n", start)]


def option(section: str, key: str) -> Option:
    return next(o for o in OPTIONS if (o.section, o.key) == (section, key))


def test_the_guide_holds_the_reference_the_code_generates() -> None:
    _, block, _ = config_doc.split(GUIDE.read_text(encoding="utf-8"))
    fresh = config_doc.render()
    if block != fresh:
        diff = "".join(
            difflib.unified_diff(
                block.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                "docs/operations.md",
                "generated from zcells/config.py",
            )
        )
        pytest.fail(
            "docs/operations.md: the configuration reference differs from the option table "
            f"in zcells/config.py; regenerate it with {config_doc.REGENERATE}\n{diff}"
        )


def test_every_option_has_one_row_under_its_section_with_its_help() -> None:
    rendered = config_doc.render()
    for section in SECTIONS:
        assert rendered.count(f"### `[{section}]`") == 1
    for each in OPTIONS:
        assert rendered.count(f"| `{each.key}` |") == 1, each.key
        row = row_of(each)
        assert each.help and each.help.replace("|", "\\|") in row, each.key
        assert row.count(" | ") == 4, row


@pytest.mark.parametrize(
    ("section", "key", "kind", "default", "allowed"),
    [
        ("cells", "cell_type", "string", "`api`", "`api`, `compute`"),
        ("cells", "max_hop_count", "integer", "`10`", "1 to 64"),
        ("cells", "call_timeout", "seconds", "`60`", "at least 0.001"),
        ("cells", "reserve_percent", "number", "`10`", "0 to 100"),
        ("cells", "capabilities", "key=values list", "*none*", "key=value;value pairs"),
        ("transport", "keys_dir", "path", "*derived*", "a directory path"),
        ("transport", "handshake_timeout", "seconds", "`5`", "0.1 to 600"),
        ("service", "log_level", "string", "`info`", "`debug`, `info`, `warning`, `error`"),
    ],
)
def test_a_row_says_type_default_and_allowed_values(
    section: str, key: str, kind: str, default: str, allowed: str
) -> None:
    cells = [part.strip() for part in row_of(option(section, key)).strip("|").split(" | ")]
    assert cells[1:3] == [kind, default]
    assert cells[3].startswith(allowed)


@pytest.mark.parametrize("each", OPTIONS, ids=lambda o: f"{o.section}.{o.key}")
def test_the_documented_range_is_what_the_parser_enforces(each: Option) -> None:
    bounds = config_doc.parser_bounds(each)
    if "choices" in bounds:
        for choice in bounds["choices"]:
            assert each.parse(choice) == choice
        with pytest.raises(ValueError):
            each.parse("not-" + bounds["choices"][0])
    if "low" in bounds:
        low, high = bounds["low"], bounds.get("high")
        step = 1 if isinstance(low, int) else 0.0005
        each.parse(str(low))
        with pytest.raises(ValueError):
            each.parse(str(low - step))
        if high is not None:
            each.parse(str(high))
            with pytest.raises(ValueError):
                each.parse(str(high + step))


@pytest.mark.parametrize("each", OPTIONS, ids=lambda o: f"{o.section}.{o.key}")
def test_a_documented_default_reads_back_as_the_default(each: Option) -> None:
    shown = config_doc.default_text(each)
    if shown.startswith("*"):  # derived, or no capabilities at all
        assert each.default in (None, {})
        return
    assert each.parse(shown.strip("`")) == each.default


def test_update_rewrites_only_the_block_and_is_idempotent(tmp_path: Path) -> None:
    guide = tmp_path / "guide.md"
    stale = f"{config_doc.BEGIN}\nold table\n{config_doc.END}\n"
    guide.write_text(f"# Title\n\nbefore\n\n{stale}\nafter\n", encoding="utf-8")
    assert config_doc.update(guide) is True
    text = guide.read_text(encoding="utf-8")
    assert text == f"# Title\n\nbefore\n\n{config_doc.render()}\nafter\n"
    assert config_doc.update(guide) is False
    assert guide.read_text(encoding="utf-8") == text


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        f"{config_doc.BEGIN}\nonly the start\n",
        f"{config_doc.END}\n{config_doc.BEGIN}\n",
        f"{config_doc.BEGIN}\n{config_doc.END}\n{config_doc.BEGIN}\n{config_doc.END}\n",
    ],
)
def test_a_guide_without_one_well_formed_block_is_refused(text: str) -> None:
    with pytest.raises(config_doc.GuideError):
        config_doc.split(text)


def test_the_command_prints_the_reference_or_updates_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert config_doc.main([]) == 0
    assert capsys.readouterr().out == config_doc.render()
    guide = tmp_path / "guide.md"
    guide.write_text("no markers\n", encoding="utf-8")
    assert config_doc.main(["--update", str(guide)]) == 1
    assert "exactly one" in capsys.readouterr().err
    guide.write_text(f"{config_doc.BEGIN}\n{config_doc.END}\n", encoding="utf-8")
    assert config_doc.main(["--update", str(guide)]) == 0
    assert guide.read_text(encoding="utf-8") == config_doc.render()
