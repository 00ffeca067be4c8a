"""Relative links in README.md and docs/*.md point at files that exist, and the README links every page.

The docs were split out of one long README; a moved or renamed page must not leave dead links behind.
Anchors (`page.md#section`) are not checked: GitHub derives them from headings, and a stale one still
lands on the right page.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Code is not prose: a `[x](y)` inside a fence or a backticked span is an example, not a link.
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) or ![alt](target), with an optional "title" after the target.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(markdown):
    """The link targets of a markdown text, code blocks and code spans left out."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    return _LINK.findall(prose)


def local_target(target):
    """The path part of a relative link, or None for web, mail and anchor-only links."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
        return None
    return target.split("#", 1)[0]


def test_links_parser_reads_what_the_pages_write():
    text = ('See [a](docs/a.md#x), ![img](pic.png "t"), [web](https://x.org/a), [top](#top), '
            '`[code](not/a/link.md)` and [nested [b]](b.md).\n```\n[fenced](no.md)\n```\n')
    assert [local_target(t) for t in links(text)] == ["docs/a.md", "pic.png", None, None, "b.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        path = local_target(target)
        if path and not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_links_every_docs_page():
    readme = ROOT / "README.md"
    linked = {(readme.parent / local_target(t)).resolve()
              for t in links(readme.read_text(encoding="utf-8")) if local_target(t)}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link these docs pages: {unlinked}"
