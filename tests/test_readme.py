"""The README and docs/ say what the code does: shown outputs are what the commands print today, links lead to
files that exist, config keys are the real ones, and the README's test command is the one CI runs.

A block that drifted: ``python -m tests.readme_outputs --update`` rewrites it (then read the diff)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests import readme_outputs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHECKED = [p for p in readme_outputs.pages() if readme_outputs.blocks(p.read_text())]


def test_the_readme_and_the_docs_have_checked_outputs():
    assert README in CHECKED
    assert sum(b.kind == "output" for b in readme_outputs.blocks(README.read_text())) >= 3


@pytest.mark.parametrize("page", CHECKED, ids=[str(p.relative_to(ROOT)) for p in CHECKED])
def test_every_shown_output_is_what_the_command_prints(page):
    diffs = readme_outputs.drift(page)
    assert not diffs, "\n".join(diffs) + "\n(python -m tests.readme_outputs --update rewrites them)"


def test_normalise_ignores_run_times_and_trailing_spaces():
    assert readme_outputs.normalise("done in 12.3 s  \nok\n") == readme_outputs.normalise("done in 60.0 s\nok")


def test_markers_are_parsed_with_their_blocks():
    text = "x\n<!-- setup: make it -->\n```bash\nmake it\n```\n<!-- output: echo hi -->\n```text\nhi\n```\n"
    setup, output = readme_outputs.blocks(text)
    assert (setup.kind, setup.command, setup.shown) == ("setup", "make it", None)
    assert (output.kind, output.command, output.shown) == ("output", "echo hi", "hi\n")
    assert text[output.span[0]:output.span[1]] == "hi\n"


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 400


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^(python -m pytest.*)$", ci, re.M).group(1).strip()
    assert f'pip install -e ".[test]" && {command}\n' in README.read_text()


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_lead_to_files_that_exist(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_the_repository_files_a_page_names_exist(page):
    # a file of the repository named in backticks (`tests/unit/...py`, `torchdiag/_stats/_rows.c`); TensorBoard tags
    # such as `torchdiag/record_interval` have no file suffix and are not files
    named = re.findall(r"`((?:torchdiag|tests|docs|examples|benchmarks)/[\w/.-]+\.\w+)`", page.read_text())
    missing = [n for n in named if not (ROOT / n).exists()]
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_the_readme_links_every_docs_page():
    text = README.read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, page.name


def test_the_configuration_page_names_every_key_and_only_real_ones():
    keys = set(yaml.safe_load((ROOT / "torchdiag" / "defaults.yaml").read_text()))
    page = (ROOT / "docs" / "configuration.md").read_text()
    rows = [line.split("|")[1] for line in page.splitlines() if line.startswith("| `")]
    named = {k for cell in rows for k in re.findall(r"`(\w+)`", cell)}
    assert named == keys, (sorted(keys - named), sorted(named - keys))


def test_the_readme_and_docs_say_nothing_of_files_users_do_not_have():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        assert "reference/0" not in text, page.name
        assert not re.search(r"(?<![\w/])#\d+\b", text), (page.name, re.findall(r".{30}#\d+.{10}", text))


def test_the_changelog_has_the_version_of_the_package():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert headings[:2] == ["Unreleased", version], headings
