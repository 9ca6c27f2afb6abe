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
    (["-m", "longvila_mcore.eval.needle"], "needle_eval.md"),
    (["tools/plan_parallelism.py"], "cluster.md"),
    (["tools/make_shards.py", "llava"], "data_format.md"),
    (["tools/make_shards.py", "tokens"], "data_format.md"),
    (["tools/plot_metrics.py"], "benchmarks.md"),
]

SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.M)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def help_text(command: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "1000"}  # argparse wraps help at the terminal width
    return subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def help_options(command: list[str]) -> set[str]:
    out = help_text(command)
    return set(OPTION.findall(out)) - {"--help", "--nproc-per-node"}  # torchrun's, in usage


def documented_options(page: str) -> set[str]:
    """Options in the first cell of the page's table rows (its option tables)."""
    found = set()
    text = (DOCS / page).read_text()
    for include in SNIPPET.findall(text):  # pages may include a file kept beside the code
        text += (ROOT / include).read_text()
    for line in text.splitlines():
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


def test_mmsp_figure_is_current():
    """docs/figures/mmsp_layout.svg is what its script draws from today's sharding code."""
    sys.path.insert(0, str(DOCS / "figures"))
    try:
        import mmsp_layout
    finally:
        sys.path.pop(0)
    assert mmsp_layout.OUT.read_text() == mmsp_layout.render(), (
        "the sharding changed: run `python docs/figures/mmsp_layout.py` and commit the SVG"
    )


def test_train_help_and_stages_page_list_every_stage():
    stages = sorted(p.stem for p in (ROOT / "configs" / "stage").glob("*.yaml"))
    out = help_text(["-m", "longvila_mcore.train"])
    assert "+stage=<name>" in out and "docs/stages.md" in out
    groups = next(line for line in out.splitlines() if line.startswith("stage: "))
    assert sorted(groups.removeprefix("stage: ").split(", ")) == stages
    table = re.findall(r"^\| `([\w.]+)` \|", (DOCS / "stages.md").read_text(), re.M)
    assert sorted(s for s in table if s[0].isdigit()) == stages
