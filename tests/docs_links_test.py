"""Every relative link and image in the repository's Markdown points at a file that exists,
and every #anchor at a heading of its page: results and docs move, and a broken link
shows nothing until a reader follows it."""
import pathlib
import re

from tests.support.train_helpers import REPO

# Inline links and images, [text](target) and ![alt](target), optionally with a "title".
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_SKIPPED_DIRS = ("workdir", "build", "node_modules")


def markdown_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The Markdown files under `root`, outside hidden, virtual-environment and run folders."""
    return sorted(p for p in root.rglob("*.md")
                  if not any(part.startswith((".",) + _SKIPPED_DIRS) or part.endswith(".egg-info")
                             or "venv" in part for part in p.relative_to(root).parts[:-1]))


def _prose(text: str) -> str:
    """`text` without fenced code blocks and code spans, where brackets are not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered -1, -2, ..."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(root: pathlib.Path) -> list[str]:
    """'page: target (why)' for each relative link or image under `root` that resolves to
    no file, or to a page without the heading its #anchor names."""
    broken = []
    for page in markdown_files(root):
        text = page.read_text(encoding="utf-8")
        for target in _LINK.findall(_prose(text)):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(
                    resolved.read_text(encoding="utf-8")):
                broken.append(f"{where} (no heading #{anchor})")
    return broken


def test_every_relative_link_and_image_in_the_markdown_resolves():
    assert len(markdown_files(REPO)) >= 10  # README, BENCHMARKS, docs/, results/
    assert broken_links(REPO) == []


def test_a_missing_file_or_heading_is_reported_and_code_is_not_read_as_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "grid.png").write_bytes(b"")
    (tmp_path / "docs" / "page.md").write_text(
        "# The `page`: one\n\n## Results, twice\n\n## Results, twice\n")
    (tmp_path / "README.md").write_text(
        "![ok](grid.png) [ok](docs/page.md#the-page-one) [ok](docs/page.md#results-twice-1)\n"
        "[ok](https://example.com/none.png) [ok](#top)\n\n# Top\n\n"
        "![gone](docs/grid.png) [gone](docs/page.md#results-thrice)\n"
        "`[code](nowhere.md)`\n\n```\n[fenced](nowhere.md)\n```\n")
    assert broken_links(tmp_path) == ["README.md: docs/grid.png (no such file)",
                                      "README.md: docs/page.md#results-thrice (no heading "
                                      "#results-thrice)"]
