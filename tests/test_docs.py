"""The README and docs/ point only at things that exist; the README stays a short front door.

Checked in README.md and every docs/*.md:

* every relative Markdown link ``[text](target)`` (not http(s), mailto or ``#anchor`` only)
  names a file or folder, resolved from the page's own folder, fragment stripped;
* every ``benchmarks/...`` path named in the text exists from the repository root. Paths
  with a placeholder (``*``, ``<``, ``{``) are patterns, and a path right after ``--out``
  is what a command would write, not a file the page relies on; both are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 12_500

LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
BENCH = re.compile(r"(?<![\w./-])benchmarks/[^\s`'\"()\[\],;|]*")
SKIP_SCHEMES = ("http://", "https://", "mailto:")
PLACEHOLDERS = ("*", "<", "{")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def missing_links(page: Path) -> list[str]:
    missing = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(SKIP_SCHEMES) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(f"{_rel(page)}: link {target}")
    return missing


def missing_benchmark_paths(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    missing = []
    for m in BENCH.finditer(text):
        path = m.group(0).rstrip(".,:;)`")
        if any(c in path for c in PLACEHOLDERS):
            continue
        if re.search(r"--out\s+$", text[max(0, m.start() - 12) : m.start()]):
            continue
        if not (ROOT / path).exists():
            missing.append(f"{_rel(page)}: {path}")
    return missing


def test_there_are_pages_to_check():
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 1, "no docs/*.md found"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_exist(page: Path):
    missing = missing_links(page)
    assert not missing, "links to missing files:\n" + "\n".join(missing)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_benchmark_paths_exist(page: Path):
    missing = missing_benchmark_paths(page)
    assert not missing, "benchmarks paths that do not exist:\n" + "\n".join(missing)


def test_readme_is_a_front_door():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail into docs/"
    )
