"""The README stays true: its two commands exist, and every setting is in its table."""

from __future__ import annotations

import os
import re
from pathlib import Path

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SOURCES = [
    path
    for package in ("api", "shared", "worker", "lookalike")
    for path in ROOT.glob(f"{package}/**/*.py")
]


def settings_variables() -> set[str]:
    found = set()
    for group in Settings.model_fields.values():
        model = group.annotation
        for field in model.model_fields.values():  # type: ignore[union-attr]
            found.add(str(field.validation_alias))
    return found


def test_the_first_two_commands_are_the_serve_and_test_scripts() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None
    commands = [line.split()[0] for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["scripts/serve.sh", "scripts/test.sh"]
    for command in commands:
        assert os.access(ROOT / command, os.X_OK), command


def test_every_setting_and_variable_the_code_reads_is_in_the_configuration_table() -> None:
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(LOOKALIKE_[A-Z_]+)`", table, re.M))
    read = {
        name for path in SOURCES for name in re.findall(r"LOOKALIKE_[A-Z_]*[A-Z]", path.read_text())
    }

    assert settings_variables() <= documented
    assert read - documented == set()
    assert documented - read == set(), "documented but never read"


def test_the_result_picture_the_readme_shows_exists() -> None:
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert pictures
    for picture in pictures:
        assert (ROOT / picture).is_file(), picture
