"""No links to files outside the repository (issue 28): the README, docs and docstrings name only files a
clone has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]


def test_no_references_to_the_development_machine():
    bad = []
    for f in tracked("*.py", "*.md", "*.yaml", "*.toml", "Makefile", "*.sh"):
        if f.name == "test_links.py":
            continue
        for i, line in enumerate(f.read_text(errors="ignore").splitlines(), 1):
            if re.search(r"(?<![\w.])shared/(docs|reference)/|/work/(main|shared|wt-)", line):
                bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not bad, "\n".join(bad)


def test_relative_markdown_links_resolve():
    bad = []
    for f in tracked("*.md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", f.read_text(errors="ignore")):
            if re.match(r"[a-z]+:|#|mailto:", target):
                continue
            path = (f.parent / target.split("#")[0]).resolve()
            if not path.exists():
                bad.append(f"{f.relative_to(ROOT)} -> {target}")
    assert not bad, "\n".join(bad)


def test_docs_named_in_backticks_exist():
    """A ``docs/<page>.md`` named in a docstring, comment or page exists in the repository."""
    bad = []
    for f in tracked("*.py", "*.md"):
        for name in set(re.findall(r"(?<![\w/.])(docs/[\w./-]+\.md)", f.read_text(errors="ignore"))):
            if not (ROOT / name).exists():
                bad.append(f"{f.relative_to(ROOT)} -> {name}")
    assert not bad, "\n".join(bad)
