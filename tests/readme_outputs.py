"""The console outputs the README and the docs pages show, checked against what the code prints.

A checked block is a fenced code block right after a marker line::

    <!-- output: torchdiag check examples/quickstart.py:make_model --input-shape 128,32 -->
    ```text
    ...what the command prints (stdout and stderr together)...
    ```

``<!-- setup: COMMAND -->`` runs a command whose output is not shown (it writes a logdir a later block reads).
The commands of one page run in order, in one temporary directory holding a link to ``examples/``, through a
shell (pipes work), with ``torchdiag`` and ``python`` being this checkout's, ``NO_COLOR=1``.

    python -m tests.readme_outputs            # check every page; prints a diff per block that drifted
    python -m tests.readme_outputs --update   # rewrite the blocks with what the commands print now
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- (output|setup): (.+?) -->\n(?:(```[\w-]*\n)(.*?)^```\n)?", re.M | re.S)


def pages() -> list[Path]:
    """README.md and every docs page."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    kind: str  # "output" or "setup"
    command: str
    shown: str | None  # the block's text (None for setup)
    span: tuple[int, int]  # where the block's text lies in the page (the marker's end for setup)
    fence: str


def blocks(text: str) -> list[Block]:
    found = []
    for m in MARKER.finditer(text):
        kind, command = m.group(1), m.group(2).strip()
        if kind == "output":
            if m.group(3) is None:
                raise ValueError(f"no fenced block right after the marker <!-- output: {command} -->")
            found.append(Block(kind, command, m.group(4), (m.start(4), m.end(4)), m.group(3)))
        else:
            end = m.start(3) if m.group(3) is not None else m.end()
            found.append(Block(kind, command, None, (end, end), ""))
    return found


def normalise(out: str) -> str:
    """Trailing spaces go; run times ("done in 12.3 s") and what a recording costs (the time budget's "recorded:"
    line) do not count."""
    out = re.sub(r"\b\d+(\.\d+)? s\b(?=\s*$)", "<t> s", out, flags=re.M)
    out = re.sub(r"^(recorded: .*)$", lambda m: re.sub(r"\d+(\.\d+)?(e-?\d+)?", "<n>", m.group(1)), out, flags=re.M)
    return "\n".join(line.rstrip() for line in out.splitlines()) + ("\n" if out.strip() else "")


def _environment(tmp: Path) -> dict[str, str]:
    bin_dir = tmp / ".bin"
    bin_dir.mkdir()
    for name, line in (("torchdiag", f'exec "{sys.executable}" -m torchdiag "$@"'),
                       ("python", f'exec "{sys.executable}" "$@"')):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{line}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    (tmp / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", NO_COLOR="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
               PYTHONWARNINGS="default")
    return env


def run_page(page: Path, timeout: float = 300) -> list[tuple[Block, str]]:
    """Each block of ``page`` with what its command prints now (normalised), in order."""
    found = blocks(page.read_text())
    results = []
    if not found:
        return results
    with tempfile.TemporaryDirectory(prefix="torchdiag-docs-") as tmp:
        env = _environment(Path(tmp))
        for block in found:
            done = subprocess.run(block.command, shell=True, cwd=tmp, env=env, text=True, timeout=timeout,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if block.kind == "setup" and done.returncode != 0:
                raise RuntimeError(f"setup command failed ({done.returncode}): {block.command}\n{done.stdout}")
            results.append((block, normalise(done.stdout)))
    return results


def drift(page: Path) -> list[str]:
    """One unified diff per block whose text differs from what its command prints."""
    diffs = []
    for block, printed in run_page(page):
        if block.kind == "output" and normalise(block.shown or "") != printed:
            diffs.append(f"{page.relative_to(ROOT)}: `{block.command}`\n" + "".join(difflib.unified_diff(
                (block.shown or "").splitlines(True), printed.splitlines(True), "shown", "printed now")))
    return diffs


def update(page: Path) -> int:
    """Rewrite the page's blocks with what the commands print now; returns how many changed."""
    text = page.read_text()
    changed = 0
    for block, printed in reversed(run_page(page)):
        if block.kind == "output" and block.shown != printed:
            start, end = block.span
            text = text[:start] + printed + text[end:]
            changed += 1
    page.write_text(text)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="check (or --update) the outputs the README and docs show")
    parser.add_argument("--update", action="store_true", help="rewrite the blocks with the outputs of today")
    parser.add_argument("pages", nargs="*", type=Path, help="pages to check (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    todo = [p.resolve() for p in args.pages] or pages()
    if args.update:
        for page in todo:
            print(f"{page.relative_to(ROOT)}: {update(page)} block(s) rewritten")
        return 0
    diffs = [d for page in todo for d in drift(page)]
    print("\n".join(diffs) if diffs else "every shown output matches")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
