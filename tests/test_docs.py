"""README and docs/ read as a reference: every relative link resolves to a file and, for a page,
to one of its headings; every file kept under docs/ is named by a page; no page carries a diary date."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("**/*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup and punctuation dropped, lowercase, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of `page`, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    """Targets of the page's links that point into this repository."""
    return [t for t in _LINK.findall(prose(page.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_slug_follows_github() -> None:
    assert slug("Against `simulate`: the flow") == "against-simulate-the-flow"
    assert slug("Scale: 30,000 rounds of the `tiny` model") == "scale-30000-rounds-of-the-tiny-model"
    assert slug("The target: FP within 1.10x of dense WER") == "the-target-fp-within-110x-of-dense-wer"
    assert slug("Resume, bit for bit") == "resume-bit-for-bit"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links (fix the path or the heading):\n" + "\n".join(broken)


def test_every_file_kept_under_docs_is_named_by_a_page() -> None:
    text = "\n".join(p.read_text() for p in PAGES)
    unnamed = [
        str(f.relative_to(ROOT)) for f in sorted(DOCS.glob("**/*"))
        if f.is_file() and f.suffix != ".md"
        and str(f.relative_to(ROOT)) not in text and str(f.relative_to(DOCS)) not in text
    ]
    assert not unnamed, f"files under docs/ that no page names (link them from a page or remove them): {unnamed}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_diary_dates(page: Path) -> None:
    dated = [line for line in page.read_text().splitlines() if _DATE.search(line)]
    assert not dated, (
        f"{page.relative_to(ROOT)} dates what it states (a reference says what is true now; git log keeps "
        f"when): {dated[:3]}"
    )
