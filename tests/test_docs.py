"""The docs site documents what the command lines accept, and its generated figure is current.

`mkdocs build --strict` (run by .ci/run) catches broken links and API references; these tests
catch what it cannot: an option added to a CLI but not to its page, or a page documenting an
option that no longer exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# (command line whose --help is read, docs page with its option table)
CLIS = [
    (["-m", "longvila_mcore.generate"], "evaluation.md"),
    (["tools/convert_checkpoint.py", "hf-to-mcore"], "checkpoints.md"),
    (["tools/convert_checkpoint.py", "mcore-to-hf"], "checkpoints.md"),
]

OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def help_options(command: list[str]) -> set[str]:
    env = {**os.environ, "COLUMNS": "1000"}  # argparse wraps help at the terminal width
    out = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(OPTION.findall(out)) - {"--help"}


def documented_options(page: str) -> set[str]:
    """Options in the first cell of the page's table rows (its option tables)."""
    found = set()
    for line in (DOCS / page).read_text().splitlines():
        if line.startswith("| `"):
            found |= set(OPTION.findall(line.split("|")[1]))
    return found


@pytest.fixture(scope="module")
def options() -> dict[tuple[str, ...], set[str]]:
    return {tuple(cmd): help_options(cmd) for cmd, _ in CLIS}


@pytest.mark.parametrize(
    ("command", "page"), CLIS, ids=lambda x: " ".join(x) if isinstance(x, list) else x
)
def test_every_cli_option_is_documented(command, page, options):
    missing = options[tuple(command)] - documented_options(page)
    assert not missing, (
        f"{' '.join(command)} accepts {sorted(missing)}, undocumented in docs/{page}"
    )


@pytest.mark.parametrize("page", sorted({page for _, page in CLIS}))
def test_every_documented_option_exists(page, options):
    accepted = set().union(*(options[tuple(cmd)] for cmd, p in CLIS if p == page))
    stale = documented_options(page) - accepted
    assert not stale, f"docs/{page} documents {sorted(stale)}, which no command line accepts"
