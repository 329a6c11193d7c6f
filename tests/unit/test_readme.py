"""The README stays true: every command-line option of every command is documented, every local link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import click

from shardpreempt.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_option_of_every_command_is_in_the_readme() -> None:
    """Each command's --help options (short and long) appear in the README's command reference."""
    missing = []
    for name, command in main.commands.items():
        assert f"shardpreempt {name}" in README, f"command {name} is not documented"
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    if opt.startswith("--") and opt not in README:
                        missing.append(f"{name} {opt}")
    assert not missing, f"options missing from the README: {missing}"


def test_every_local_link_in_the_readme_resolves() -> None:
    """Every relative link in the README points at a file that exists (anchors aside)."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    broken = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not broken, broken
